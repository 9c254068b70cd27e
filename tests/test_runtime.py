"""The runtime: dependency tracking on an out-of-order queue, host accessors, profiling, the program
cache and build errors (that only the runtime imports pyopencl: test_imports.py)."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pyopencl as cl
import pytest

from dpllama.errors import DpllamaError
from dpllama.runtime import Local, Queue, choose, list_devices, select_device
from dpllama.runtime import program
from dpllama.runtime.queue import MAX_READERS

N = 1024
SPIN = 20000        # ~10 ms of slow_add on PoCL: a consumer not made to wait would run before it ends
STALE = -100.0      # what a buffer holds before its producer ran


@pytest.fixture(scope="module")
def ooo():
    device = select_device()[0]
    if not device.out_of_order:
        pytest.skip(f"{device} has no out-of-order queues")
    q = Queue(device, out_of_order=True)
    return q, q.program("check.cl")


@pytest.fixture(params=["in-order", "out-of-order"])
def either_order(request, queue):
    """(queue, check.cl) on an in-order queue, then on the out-of-order one (skipped where there is none)."""
    if request.param == "out-of-order":
        return request.getfixturevalue("ooo")
    return queue, queue.program("check.cl")


def filled(q, value):
    return q.buffer(host=np.full(N, value, np.float32))


def slow_add(q, prog, src, dst, c, spin=SPIN):
    """dst = src + c, after `spin` busy iterations per element."""
    return q.submit(prog.slow_add, (N,), None, src.read(), dst.write(), np.float32(c), np.int32(N), np.int32(spin))


def assert_all(buf, value):
    np.testing.assert_allclose(buf.get(), np.full(N, value, np.float32), rtol=1e-5)


def test_queue_is_really_out_of_order(ooo):
    """Control for the tests below: the same chain through raw pyopencl, without wait lists, may run
    the fast consumer before the slow producer (PoCL does, most of the time), so a dependency edge
    the runtime failed to add would show up as a wrong answer. Which way it goes is not asserted."""
    q, prog = ooo
    assert q.cl_queue.properties & cl.command_queue_properties.OUT_OF_ORDER_EXEC_MODE_ENABLE
    a, b, c = filled(q, 1), filled(q, STALE), filled(q, 0)
    for src, dst, spin in ((a, b, SPIN), (b, c, 0)):
        k = prog.slow_add.create()
        k.set_args(src.cl_buffer, dst.cl_buffer, np.float32(1), np.int32(N), np.int32(spin))
        cl.enqueue_nd_range_kernel(q.cl_queue, k, (N,), None)
    q.wait()
    out = np.empty(N, np.float32)
    cl.enqueue_copy(q.cl_queue, out, c.cl_buffer).wait()
    assert np.isin(out, [3, STALE + 1]).all()     # each element saw b either written or not yet


def test_read_after_write_chain(ooo):
    q, prog = ooo
    x0, x1, x2, x3 = filled(q, 1), filled(q, STALE), filled(q, STALE), filled(q, STALE)
    slow_add(q, prog, x0, x1, 1)
    slow_add(q, prog, x1, x2, 1)
    slow_add(q, prog, x2, x3, 1, spin=0)    # fast: without its edge it reads x2 before x2 is written
    assert_all(x3, 4)


def test_write_after_read(ooo):
    q, prog = ooo
    x, y, new = filled(q, 1), filled(q, STALE), filled(q, 50)
    slow_add(q, prog, x, y, 1)              # reads x, in work-group after work-group, for ~10 ms
    slow_add(q, prog, new, x, 0, spin=0)    # overwrites x: must wait for that reader
    assert_all(y, 2)
    assert_all(x, 50)


def test_write_after_write(ooo):
    q, prog = ooo
    a, b, x = filled(q, 1), filled(q, 50), filled(q, STALE)
    slow_add(q, prog, a, x, 1)
    slow_add(q, prog, b, x, 0, spin=0)      # the later write must land last
    q.wait()                                # x.get() alone would not wait for a stray earlier writer
    assert_all(x, 50)


def test_host_read_sees_finished_data(ooo):
    q, prog = ooo
    x, y = filled(q, 1), filled(q, STALE)
    slow_add(q, prog, x, y, 1)
    assert_all(y, 2)                        # no q.wait(): get() waits for the writer itself


def test_host_write_waits_for_readers(ooo):
    q, prog = ooo
    x, y = filled(q, 1), filled(q, STALE)
    slow_add(q, prog, x, y, 1)
    x.set(np.full(N, 50, np.float32))       # must not land before the kernel read x
    assert_all(y, 2)
    assert_all(x, 50)


def test_many_readers_fold_into_a_marker(ooo):
    """A buffer read more than MAX_READERS times (weights, every token) keeps a bounded reader list,
    and a later write still waits for every reader, including one folded into the marker."""
    q, prog = ooo
    x, y, z = filled(q, 1), filled(q, 0), filled(q, STALE)
    gate = cl.UserEvent(q.context)
    opener = threading.Timer(0.2, gate.set_status, (cl.command_execution_status.COMPLETE,))
    try:
        y.last_write = gate                 # the first reader of x (y += x) cannot start before the gate opens
        q.submit(prog.axpy, (N,), None, x.read(), y.read_write(), np.float32(1), np.int32(N))
        for _ in range(MAX_READERS + 1):
            slow_add(q, prog, x, z, 1, spin=0)
        assert len(x.reads) < MAX_READERS
        opener.start()
        x.set(np.full(N, 50, np.float32))   # blocks until the gated reader has run
    finally:    # never leave the module's queue stuck behind the gate
        opener.join() if opener.ident else gate.set_status(cl.command_execution_status.COMPLETE)
    assert_all(y, 1)


def test_get_async_copies_the_state_at_its_place_in_the_queue(either_order):
    """The copy sees the writes before it and none after it, also when a later write would be quick
    to overtake it on an out-of-order queue (the runtime orders that write behind the copy)."""
    q, prog = either_order
    x, y, new = filled(q, 1), filled(q, STALE), filled(q, 50)
    slow_add(q, prog, x, y, 1)
    out, copied = y.get_async()
    slow_add(q, prog, new, y, 0, spin=0)
    copied.wait()
    np.testing.assert_array_equal(out, np.full(N, 2, np.float32))
    assert_all(y, 50)


def test_replay_runs_recorded_commands_in_order(either_order):
    """replay: a chain of recorded commands, run twice; each launch counts."""
    q, prog = either_order
    x, y, z = filled(q, 1), filled(q, 0), filled(q, STALE)
    cmds = [q.command(prog.slow_add, (N,), None, x.read(), y.write(), np.float32(1), np.int32(N), np.int32(SPIN)),
            q.command(prog.axpy, (N,), None, y.read(), z.read_write(), np.float32(2), np.int32(N))]
    z.set(np.zeros(N, np.float32))
    launches = q.launches
    q.replay(cmds)
    q.replay(cmds)
    assert_all(z, 8)                        # z += 2 y twice, y = x + 1 each time
    assert q.launches == launches + 4


def test_live_queues_are_drained_at_exit(queue):
    """The runtime's atexit hook (queue._drain) waits for every live queue's commands, so no kernel is left running
    while the process shuts the driver down: a slow kernel still running when it is called has ended after it."""
    from dpllama.runtime import queue as queue_module
    prog = queue.program("check.cl")
    event = slow_add(queue, prog, filled(queue, 1), filled(queue, 0), 1, spin=4 * SPIN)
    assert event.cl_event.command_execution_status != cl.command_execution_status.COMPLETE, "ended too soon to tell"
    queue_module._drain()
    assert event.cl_event.command_execution_status == cl.command_execution_status.COMPLETE


@pytest.mark.parametrize("local", [16, 64, 256])
def test_group_sum(queue, local):
    prog = queue.program("check.cl")
    x = np.random.default_rng(local).standard_normal(N, dtype=np.float32)
    out = queue.buffer(4 * (N // local))
    queue.submit(prog.group_sums, (N,), (local,), queue.buffer(host=x).read(), out.write(), Local(4 * local))
    np.testing.assert_allclose(out.get(), x.reshape(-1, local).sum(axis=1), rtol=1e-4, atol=1e-4)


def test_profiling_events_and_summary():
    q = Queue(select_device()[0], profiling=True)
    prog = q.program("check.cl")
    x, y, sums = filled(q, 1), filled(q, 0), q.buffer(4 * (N // 64))
    events = [slow_add(q, prog, x, y, 1, spin=1000) for _ in range(2)]
    events.append(q.submit(prog.group_sums, (N,), (64,), y.read(), sums.write(), Local(4 * 64)))
    assert all(e.duration_ns > 0 for e in events)
    profile = q.profile()
    assert {k: v["calls"] for k, v in profile.items()} == {"slow_add": 2, "group_sums": 1}
    assert profile["slow_add"]["ns"] == events[0].duration_ns + events[1].duration_ns
    assert q.profile() == {}                # reading the profile clears it


BUILD_AND_REPORT = ("import json; from dpllama.runtime import open_queue, build_stats; "
                    "open_queue().program('check.cl'); print(json.dumps(build_stats))")


def test_binary_cache_across_processes(tmp_path, repo_root):
    env = {**os.environ, "DPLLAMA_HOME": str(tmp_path)}

    def build_in_fresh_process() -> dict:
        run = subprocess.run([sys.executable, "-c", BUILD_AND_REPORT], cwd=repo_root, env=env,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    assert build_in_fresh_process() == {"compiled": 1, "loaded": 0}
    assert build_in_fresh_process() == {"compiled": 0, "loaded": 1}
    [binary] = (tmp_path / "kernels").glob("check-*.bin")
    binary.write_bytes(b"not a binary")     # a corrupt or foreign binary is rebuilt, not fatal
    assert build_in_fresh_process() == {"compiled": 1, "loaded": 0}


BUILD_AND_LAUNCH = ("import numpy as np; from dpllama.runtime import open_queue; q = open_queue(); "
                    "x = q.buffer(host=np.ones(64, np.float32)); y = q.buffer(host=np.zeros(64, np.float32)); "
                    "q.submit(q.program('check.cl').axpy, (64,), None, x.read(), y.read_write(), np.float32(2), "
                    "np.int32(64)); assert (y.get() == 2).all()")


def test_pocl_compiles_only_the_kernels_launched(tmp_path, repo_root):
    """PoCL keeps its builds itself and compiles a kernel when it is launched, for its work-group size: dpllama must
    not ask it for the program's binary, which compiles every kernel of the program once more for any size (a
    `0-0-0` folder per kernel in its cache: 3.4 s of 3.9 for matrix.cl). Its own file there is the note."""
    if not program.driver_caches(select_device()[0]):
        pytest.skip("the device dpllama uses here is not PoCL's, or PoCL's kernel cache is off")
    env = {**os.environ, "DPLLAMA_HOME": str(tmp_path / "home"), "POCL_CACHE_DIR": str(tmp_path / "pocl")}
    for _ in range(2):      # compiled, then from both caches
        run = subprocess.run([sys.executable, "-c", BUILD_AND_LAUNCH], cwd=repo_root, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0 and not run.stderr, run.stderr
    built = sorted(so.parent.parent.name for so in (tmp_path / "pocl").rglob("*.so"))
    devices = list_devices()
    choose(devices)     # the device probe's kernels, on each PoCL device the choice probed (the same CPU twice: both)
    probes = [k for d in devices        # a PoCL whose compiler fails (the pip one's LLVM 14 on Zen 5) builds nothing
              if d.probed is not None and not d.probed.error and program.driver_caches(d)
              for k in (["isa", "vnni"] if d.probed.vnni_asm else ["isa"])]
    assert built == sorted(["axpy", *probes]), built     # not slow_add, group_sums, read_sum, nor for any size
    [note] = (tmp_path / "home" / "kernels").glob("check-*.bin")
    assert note.read_bytes() == program.DRIVER_NOTE


def test_build_failure_names_file_and_compiler_log(queue, tmp_path, monkeypatch):
    (tmp_path / "common.h").write_text((program.KERNEL_DIR / "common.h").read_text())
    (tmp_path / "broken.cl").write_text("// broken on purpose\n"
                                        '#include "common.h"\n'
                                        "__kernel void f(__global float *x) {\n"
                                        "    x[0] = undefined_name;\n"
                                        "}\n")
    monkeypatch.setattr(program, "KERNEL_DIR", tmp_path)
    monkeypatch.setenv("DPLLAMA_HOME", str(tmp_path / "home"))
    with pytest.raises(DpllamaError) as e:
        queue.program("broken.cl")
    message = str(e.value)
    assert str(tmp_path / "broken.cl") in message
    assert "undefined_name" in message
    assert "broken.cl:4" in message         # the #line directives count broken.cl's own lines, past common.h's


def test_missing_kernel_file(queue, tmp_path, monkeypatch):
    with pytest.raises(DpllamaError, match="no-such-file.cl: kernel file not found"):
        queue.program("no-such-file.cl")
    (tmp_path / "a.cl").write_text('#include "gone.h"\n')
    monkeypatch.setattr(program, "KERNEL_DIR", tmp_path)
    with pytest.raises(DpllamaError, match=r"gone.h: kernel file not found \(included by a.cl\)"):
        queue.program("a.cl")


def test_cache_key_covers_included_files(queue, tmp_path, monkeypatch):
    """Editing a header that a program includes (check.cl includes common.h) rebuilds it; one it does not
    include leaves its binary as it is."""
    kernels = tmp_path / "cl_kernels"
    shutil.copytree(program.KERNEL_DIR, kernels)
    monkeypatch.setattr(program, "KERNEL_DIR", kernels)
    before = program.cache_path(queue.device, "check.cl")
    weights = kernels / "weights.h"
    weights.write_text(weights.read_text() + "// an edit\n")
    assert program.cache_path(queue.device, "check.cl") == before
    common = kernels / "common.h"
    common.write_text(common.read_text() + "// an edit\n")
    assert program.cache_path(queue.device, "check.cl") != before


def test_docstring_example(capsys):
    """The example at the top of dpllama.runtime's docstring, run as it stands."""
    import dpllama.runtime
    example = textwrap.dedent(dpllama.runtime.__doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0])
    exec(example, {})
    assert capsys.readouterr().out.strip() == str(np.full(1000, 2, np.float32))


def test_buffer_larger_than_the_allocation_limit_is_refused(queue, monkeypatch):
    """memory.max_alloc_mb caps every buffer, with an error that says which and what to do."""
    monkeypatch.setitem(queue.config.values["memory"], "max_alloc_mb", 1)
    assert queue.max_alloc == 1 << 20
    queue.buffer(1 << 20, name="fits")
    with pytest.raises(DpllamaError, match=r"buffer k_cache needs 2\.0 MiB, more than the 1 MiB .*--ctx"):
        queue.buffer(2 << 20, name="k_cache")


def test_a_region_is_its_part_of_the_buffer(queue):
    """Buffer.region (a sub-buffer, at an offset aligned as Queue.align says): a kernel given the region reads and
    writes those bytes of the buffer, and nothing past them."""
    n, offset = 64, 2 * queue.align
    whole = queue.buffer(host=np.arange(offset // 4 + 2 * n, dtype=np.float32), name="whole")
    part = whole.region(offset, n * 4, "part")
    assert part.nbytes == n * 4
    np.testing.assert_array_equal(part.get(), np.arange(offset // 4, offset // 4 + n, dtype=np.float32))
    ones = queue.buffer(host=np.ones(n, np.float32))
    queue.submit(queue.program("check.cl").axpy, (n,), None, ones.read(), part.read_write(), np.float32(0.5),
                 np.int32(n)).wait()
    expect = np.arange(offset // 4 + 2 * n, dtype=np.float32)
    expect[offset // 4:offset // 4 + n] += 0.5
    np.testing.assert_array_equal(whole.get(), expect)


@pytest.mark.parametrize("flags, defines", [
    ({"avx2", "avx_vnni", "avx512_vnni", "avx512vl"}, ("AVXVNNI_ASM",)),          # AMD Zen 5: AVX-VNNI's VEX form
    ({"avx2", "avx512_vnni", "avx512vl"}, ("AVXVNNI_ASM", "VNNI_EVEX")),          # Zen 4, Ice Lake: AVX-512 VNNI's
    ({"avx2", "avx512_vnni"}, None),                                              # the EVEX form on ymm needs VL
    ({"avx2"}, None),
])
def test_the_avx2_paths_vnni_alternatives(monkeypatch, flags, defines):
    """A compiler that targets AVX2 on a CPU with VNNI (the pip PoCL 3.0 on AMD Zen 4) reaches it through the first of
    the AVX2 path's alternatives that the CPU's flags allow; none without them."""
    from dpllama.runtime import device as devmod
    monkeypatch.setattr(devmod, "host_cpu_flags", lambda: frozenset(flags))
    probe = devmod.Probe(macros=("__AVX2__", "__FMA__", "__F16C__", "__AVX__", "__SSE4_1__"), vnni_asm=True)
    assert (probe.asm_path and probe.asm_path.defines) == defines
    if defines:
        assert probe.defines == defines and probe.kernel_path == "avx2-vnni"
        assert "through inline assembly" in probe.why


def test_the_probe_is_kept_under_the_same_name_by_every_process(tmp_path, repo_root):
    """The probe's cache key is built from reprs: one of a set would follow the process's string hashing
    (PYTHONHASHSEED), and each run would probe again and leave a file more."""
    names = []
    for seed in ("1", "4"):     # seeds whose set iteration orders differ
        home = tmp_path / seed
        subprocess.run([sys.executable, "-c", "from dpllama.runtime import select_device; select_device()"],
                       env={**os.environ, "DPLLAMA_HOME": str(home), "PYTHONHASHSEED": seed}, cwd=repo_root,
                       check=True, timeout=120)
        names.append(sorted(p.name for p in (home / "kernels").glob("probe-*.json")))
    assert names[0] == names[1] and names[0], names


def test_vnni_through_inline_assembly_only_where_the_cpu_has_it(monkeypatch, tmp_path):
    """The probe reaches a CPU's VNNI that the compiler does not target through inline assembly (VNNI_ASM on an
    AVX-512 target, AVXVNNI_ASM on an AVX2 one), and only where the host CPU lists the instruction's flag
    (avx512_vnni, avx_vnni): elsewhere running it would kill the process (SIGILL). The probe's cache is keyed by those
    flags too, so a DPLLAMA_HOME shared with another machine never passes it on."""
    from dpllama.runtime import device as devmod
    dev = select_device()[0]
    probe = devmod.run_probe(dev.cl_device)
    path = probe.asm_path
    can = bool(path and path.compiler_macro not in probe.macros and dev.type == "cpu"
               and devmod.host_cpu_flags().issuperset(path.cpu_flags))
    assert probe.vnni_asm <= can, probe
    if "Portable Computing Language" in dev.platform:      # its compiler takes inline assembly
        assert probe.vnni_asm == can, probe
    assert probe.defines == (path.defines if probe.vnni_asm else ())
    assert probe.kernel_path.endswith("-vnni") if probe.vnni_asm else True
    assert [o for o in Queue(dev, None).build_options if "VNNI" in o] == [f"-D{d}" for d in probe.defines]
    monkeypatch.setattr(devmod, "host_cpu_flags", lambda: frozenset({"fpu", "sse2", "avx2"}))
    assert not devmod.run_probe(dev.cl_device).vnni_asm         # never tried on a CPU without the flag
    monkeypatch.setenv("DPLLAMA_HOME", str(tmp_path))
    fresh = devmod.Device(dev.index, dev.type_index, dev.cl_device)
    assert not fresh.probe().vnni_asm and fresh.probe().macros == probe.macros
    [stored] = (tmp_path / "kernels").glob("probe-*.json")
    assert json.loads(stored.read_text()) == {"macros": list(probe.macros), "vnni_asm": False}
