"""Device selection (selector strings, ranking, the reasons shown) on a fake machine with GPUs of every
vendor, and YAML config validation: each bad config fails with a message naming file, key and problem."""
from types import SimpleNamespace

import pyopencl as cl
import pytest

from dpllama.errors import DpllamaError
from dpllama.runtime import Device, Probe, choose, config_device, list_devices, load_config, select_device
from dpllama.runtime import device as devmod
from dpllama.runtime.config import CONFIG_DIR, SCHEMA, parse_config, shipped_config_for, shipped_configs


AVX512 = Probe(macros=("__AVX512F__", "__AVX2__", "__FMA__", "__F16C__", "__AVX__", "__SSE4_1__"))
AVX2 = Probe(macros=("__AVX2__", "__FMA__", "__F16C__", "__AVX__", "__SSE4_1__"))


def fake_device(index, type_index, kind, name, vendor, platform, units=8, mhz=1000, unified=False, probe=None):
    """A Device over a stand-in for cl.Device with just what selection reads, with the strings real
    drivers report, and what its compiler would show (an AVX-512 CPU's, or a GPU's: no x86 macros)."""
    cl_device = SimpleNamespace(name=name, vendor=vendor, type=kind, platform=SimpleNamespace(name=platform),
                                max_compute_units=units, max_clock_frequency=mhz, global_mem_size=8 << 30,
                                host_unified_memory=unified, driver_version="1.0")
    return Device(index, type_index, cl_device, probe or (AVX512 if kind == cl.device_type.CPU else Probe()))


GPU, CPU = cl.device_type.GPU, cl.device_type.CPU
MACHINE = [
    fake_device(0, 0, CPU, "pthread-Intel(R) Xeon(R) Processor", "GenuineIntel", "Portable Computing Language",
                units=16, mhz=2300, unified=True),
    fake_device(1, 0, GPU, "NVIDIA GeForce RTX 4090", "NVIDIA Corporation", "NVIDIA CUDA", units=128, mhz=2520),
    fake_device(2, 1, GPU, "Intel(R) Arc(TM) A380 Graphics", "Intel(R) Corporation", "Intel(R) OpenCL Graphics",
                units=128, mhz=2000),
    fake_device(3, 2, GPU, "gfx1100", "Advanced Micro Devices, Inc.", "AMD Accelerated Parallel Processing",
                units=48, mhz=2500),
    fake_device(4, 3, GPU, "Intel(R) UHD Graphics 770", "Intel(R) Corporation", "Intel(R) OpenCL Graphics",
                units=32, mhz=1450, unified=True),
]
CPU_ONLY = MACHINE[:1]


@pytest.mark.parametrize("selector, index", [
    ("cpu", 0),
    ("gpu", 1),                         # discrete first, then compute units x clock
    ("gpu:0", 1),
    ("gpu:1", 2),
    ("0", 0),
    ("3", 3),
    ("platform=Portable", 0),
    ("platform=amd", 3),                # case-insensitive
    ("vendor=NVIDIA", 1),
    ("name~Xeon", 0),
    ("gpu,vendor=Intel", 2),            # the discrete Arc over the integrated UHD
    ("gpu, name~UHD", 4),
    ("vendor=intel,name~arc,gpu:1", 2),
])
def test_selector(selector, index):
    assert choose(MACHINE, selector)[0].index == index


@pytest.mark.parametrize("selector, message", [
    ("tpu", "device selector term 'tpu': expected cpu, gpu or accelerator"),
    ("gpu:x", "device selector term 'gpu:x': expected cpu, gpu or accelerator"),
    ("other", "device selector term 'other': expected"),
    ("colour=red", "device selector term 'colour=red': unknown key 'colour'"),
    ("vendor~Intel", "device selector term 'vendor~Intel': unknown key 'vendor' (expected platform=, vendor=, isa= or name~)"),
    ("gpu:7", "selector 'gpu:7' matches no OpenCL device (found: 0: pthread-Intel(R) Xeon(R) Processor "
              "(Portable Computing Language, cpu:0); 1: NVIDIA GeForce RTX 4090"),
    ("cpu,vendor=NVIDIA", "selector 'cpu,vendor=NVIDIA' matches no OpenCL device"),
])
def test_bad_selector(selector, message):
    with pytest.raises(DpllamaError) as e:
        choose(MACHINE, selector)
    assert message in str(e.value)


def test_reasons_for_the_best_device():
    best, reasons = choose(MACHINE)
    assert best.index == 1
    passed_over = "not selected: NVIDIA GeForce RTX 4090 ranks higher (discrete first, then compute units x clock)"
    assert reasons == {0: "not selected: a gpu is preferred over a cpu",
                       1: "selected: best gpu: 128 compute units at 2520 MHz",
                       2: passed_over, 3: passed_over, 4: passed_over}


def test_reasons_for_a_selector():
    _, reasons = choose(MACHINE, "gpu:0")
    assert reasons[1] == "selected: matches selector 'gpu:0'"
    assert reasons[0] == "not selected: does not match selector 'gpu:0'"


def test_reasons_without_a_gpu():
    assert choose(CPU_ONLY)[1] == {0: "selected: the only OpenCL device"}
    two_cpus = CPU_ONLY + [fake_device(1, 1, CPU, "cpu 2", "AuthenticAMD", "Portable Computing Language",
                                         unified=True)]
    assert choose(two_cpus)[1][0] == "selected: no GPU or accelerator present; the CPU device is the default"


def test_selector_beats_environment_beats_best(monkeypatch):
    monkeypatch.setenv("DPLLAMA_DEVICE", "platform=AMD")
    assert select_device("cpu", MACHINE)[0].index == 0
    device, reasons = select_device(None, MACHINE)
    assert device.index == 3 and reasons[3] == "selected: matches DPLLAMA_DEVICE 'platform=AMD'"
    monkeypatch.setenv("DPLLAMA_DEVICE", "gpu:9")
    with pytest.raises(DpllamaError, match="^DPLLAMA_DEVICE 'gpu:9' matches no OpenCL device"):
        select_device(None, MACHINE)
    monkeypatch.delenv("DPLLAMA_DEVICE")
    assert select_device(None, MACHINE)[0].index == 1


@pytest.mark.parametrize("config, index", [("cpu", 0), ("nvidia", 1), ("intel-arc", 2), ("amd", 3)])
def test_shipped_configs_match_their_devices(config, index):
    cfg = load_config(config)
    assert config_device(cfg, MACHINE)[0].index == index
    assert shipped_config_for(MACHINE[index]).path == str(CONFIG_DIR / f"{config}.yaml")


def test_integrated_intel_gets_the_defaults():
    assert shipped_config_for(MACHINE[4]).path == "<defaults>"


@pytest.mark.parametrize("probe, config, rows", [
    (AVX512, "cpu", 16),
    (Probe(macros=("__AVX512VNNI__",) + AVX512.macros), "cpu", 16),
    (Probe(macros=("__AVX512BW__",) + AVX512.macros, vnni_asm=True), "cpu", 16),     # VNNI through inline assembly
    (AVX2, "cpu-avx2", 16),
    (Probe(macros=AVX2.macros, vnni_asm=True), "cpu-avx2", 16),                          # AVX-VNNI likewise
    (Probe(macros=("__AVXVNNI__",) + AVX2.macros), "cpu-avx2", 16),
    (Probe(macros=("__AVX__", "__SSE4_1__")), "cpu-portable", 4),
    (Probe(), "cpu-portable", 4),               # no x86 macros at all: another architecture
])
def test_cpu_config_follows_the_instruction_set(probe, config, rows):
    """A CPU gets the config of its compiler's instruction set, with no edit."""
    cpu = fake_device(0, 0, CPU, "pthread-AMD EPYC", "AuthenticAMD", "Portable Computing Language", probe=probe)
    cfg = shipped_config_for(cpu)
    assert cfg.path == str(CONFIG_DIR / f"{config}.yaml")
    assert cfg.work_group("tile_rows") == rows


def test_kernel_paths_and_their_defines(monkeypatch):
    """VNNI from the compiler or through inline assembly names the path "-vnni"; the assembly's define is the one
    for the path the compiler targets (zmm on AVX-512 BW, ymm's VEX form on AVX2), on a CPU with both VNNIs (AMD Zen 5:
    test_runtime.py checks the AVX2 path's alternatives by CPU)."""
    monkeypatch.setattr(devmod, "host_cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "avx512vl", "avx_vnni"}))
    bw = Probe(macros=("__AVX512BW__",) + AVX512.macros)
    assert (bw.kernel_path, bw.defines) == ("avx512", ())
    assert Probe(macros=bw.macros, vnni_asm=True).kernel_path == "avx512-vnni"
    assert Probe(macros=bw.macros, vnni_asm=True).defines == ("VNNI_ASM",)
    assert (AVX2.kernel_path, AVX2.defines) == ("avx2", ())
    assert Probe(macros=("__AVXVNNI__",) + AVX2.macros).kernel_path == "avx2-vnni"
    assert Probe(macros=AVX2.macros, vnni_asm=True).kernel_path == "avx2-vnni"
    assert Probe(macros=AVX2.macros, vnni_asm=True).defines == ("AVXVNNI_ASM",)
    assert Probe().defines == () and Probe().kernel_path == "portable"


def test_a_device_whose_compiler_fails_is_passed_over():
    """PoCL 3.0's LLVM 14 cannot build anything on a CPU it does not know (AMD Zen 5): another device is
    used, and with none left the error names the compiler's complaint and the fix."""
    broken = Probe(error="error: unknown target CPU 'generic'")
    cpus = [fake_device(0, 0, CPU, "pthread-AMD EPYC", "AuthenticAMD", "Portable Computing Language", units=4,
                        probe=broken),
            fake_device(1, 1, CPU, "pthread-skylake-avx512-AMD EPYC", "AuthenticAMD", "Portable Computing Language")]
    best, reasons = choose(cpus)
    assert best.index == 1
    assert reasons[0] == "not selected: its compiler fails on a one-line kernel (error: unknown target CPU 'generic')"
    with pytest.raises(DpllamaError, match=r"^no usable OpenCL device: 0: pthread-AMD EPYC .* unknown target CPU "
                                           r"'generic' \(that PoCL's LLVM does not know this CPU; a newer PoCL does: "
                                           r"`apt-get install pocl-opencl-icd`"):
        choose(cpus, "cpu:0")


def test_the_same_cpu_through_two_drivers_gets_the_wider_kernels():
    """On AMD Zen 4 the pip PoCL 3.0 compiles for AVX2 (its LLVM 14 calls the CPU znver3) and Debian's PoCL 3.1 for
    AVX-512: whichever order the ICD loader lists them in, the AVX-512 one is used."""
    def pocl(index, probe, name):
        return fake_device(index, index, CPU, name, "AuthenticAMD", "Portable Computing Language", units=2,
                           mhz=2596, unified=True, probe=probe)
    for pip_first in (True, False):
        pip, debian = pocl(0, AVX2, "pthread-AMD EPYC"), pocl(1, AVX512, "pthread-skylake-avx512-AMD EPYC")
        if not pip_first:
            pip.index, debian.index = 1, 0
        best, reasons = choose([pip, debian])
        assert best is debian
        assert reasons[pip.index] == ("not selected: pthread-skylake-avx512-AMD EPYC's compiler targets more of "
                                      "this CPU (avx512 kernels, here avx2)")
    assert choose([pip, debian], str(pip.index))[0] is pip       # a selector still chooses either
    faster = pocl(2, AVX2, "pthread-AMD EPYC")
    faster.cl_device.max_compute_units = 4                # a different, larger CPU still ranks by its size
    assert choose([pip, debian, faster])[0] is faster


def test_a_compiler_that_leaves_the_cpus_avx512_unused_says_so(monkeypatch):
    monkeypatch.setattr(devmod, "host_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512bw"}))
    assert AVX2.why.endswith("; the CPU has AVX-512 too, which it does not target (Debian's and Ubuntu's PoCL do))")
    assert "too" not in AVX512.why
    monkeypatch.setattr(devmod, "host_cpu_flags", lambda: frozenset({"avx2"}))
    assert "AVX-512" not in AVX2.why


def test_isa_selector():
    assert choose(MACHINE + [fake_device(5, 1, CPU, "cpu 2", "AuthenticAMD", "Portable Computing Language",
                                         probe=AVX2)], "isa=avx2")[0].index == 5


def test_every_shipped_config_loads():
    names = sorted(shipped_configs())
    assert names == ["amd", "cpu", "cpu-avx2", "cpu-portable", "intel-arc", "nvidia"]
    for name in names:
        assert load_config(CONFIG_DIR / f"{name}.yaml").selector


def test_prefetch_may_be_off():
    """work_group keys are positive, but the prefetch distances may be 0 (no software prefetch)."""
    wg = parse_config("work_group: {decode_prefetch: 0, prefill_prefetch: 0}", "p.yaml")["work_group"]
    assert (wg["decode_prefetch"], wg["prefill_prefetch"]) == (0, 0)
    wg = parse_config("", "d.yaml")["work_group"]
    assert (wg["decode_prefetch"], wg["prefill_prefetch"]) == (128, 512)


def test_config_without_match_falls_back_to_environment(monkeypatch):
    cfg = parse_config("queue: {profiling: true}", "plain.yaml")
    assert config_device(cfg, MACHINE)[0].index == 1
    monkeypatch.setenv("DPLLAMA_DEVICE", "cpu")
    assert config_device(cfg, MACHINE)[0].index == 0


def test_config_for_an_absent_device():
    cfg = parse_config("match: {type: gpu}", "gpu.yaml")
    with pytest.raises(DpllamaError, match=r"^gpu\.yaml: key 'match' \(gpu\): no such device present; "
                                           r"config 'gpu' matches no OpenCL device"):
        config_device(cfg, CPU_ONLY)


def test_config_for_an_absent_device_on_this_machine(tmp_path):
    path = tmp_path / "absent.yaml"
    path.write_text("match:\n  name: no such device anywhere\n")
    with pytest.raises(DpllamaError) as e:
        config_device(load_config(path), list_devices())
    assert str(e.value).startswith(f"{path}: key 'match' (name~no such device anywhere): no such device present")


@pytest.mark.parametrize("text, message", [
    ("colour: red", "unknown key 'colour' (expected one of: name, description, match, queue, "),
    ("queue:\n  in_order: true", "unknown key 'queue.in_order' (expected one of: out_of_order, profiling)"),
    ("work_group: {gemv: '64'}", "key 'work_group.gemv' must be int, found str '64'"),
    ("work_group: {gemv: true}", "key 'work_group.gemv' must be int, found bool True"),
    ("work_group: {reduce: 64.0}", "key 'work_group.reduce' must be int, found float 64.0"),
    ("work_group: {reduce: -64}", "key 'work_group.reduce' must be >= 0, found -64"),
    ("work_group: {reduce: 0}", "key 'work_group.reduce' must be a positive integer, found 0"),
    ("work_group: {reduce: 48}", "key 'work_group.reduce' must be a power of two, found 48"),
    ("work_group: {key_block: 24}",
     "key 'work_group.key_block' must be 0 or a multiple of attention_positions (16), found 24"),
    ("work_group: {attention_positions: 4, key_block: 6}",
     "key 'work_group.key_block' must be 0 or a multiple of attention_positions (4), found 6"),
    ("work_group: {attention_span: 100}",
     "key 'work_group.attention_span' must be a multiple of attention_positions and of 4 (16), found 100"),
    ("work_group: {attention_positions: 2, key_block: 0, attention_span: 6}",
     "key 'work_group.attention_span' must be a multiple of attention_positions and of 4 (4), found 6"),
    ("work_group: {attention_span: 0}", "key 'work_group.attention_span' must be a positive integer, found 0"),
    ("queue: {out_of_order: 1}", "key 'queue.out_of_order' must be bool, found int 1"),
    ("work_group: {rows_per_group: 16}", "key 'work_group.rows_per_group' is now 'work_group.tile_rows' (same meaning)"),
    ("work_group: {norm: 64}", "key 'work_group.norm' is now 'work_group.reduce' (same meaning)"),
    ("fuse: {attention_min_kv_heads: -1}", "key 'fuse.attention_min_kv_heads' must be >= 0, found -1"),
    ("queue: yes", "queue must be a mapping, found bool"),
    ("- cpu", "top level must be a mapping, found list"),
    ("build_options: -cl-mad-enable", "key 'build_options' must be list, found str"),
    ("build_options: [-cl-mad-enable, 3]", "key 'build_options' must be a list of strings"),
    ("match: {type: fpga}", "key 'match.type' must be one of cpu, gpu, accelerator, found 'fpga'"),
    ("match: {vendor: 'Advanced Micro Devices, Inc.'}",
     "key 'match.vendor' must not contain ',' (values match as substrings, 'Advanced Micro Devices' "
     "is enough)"),
    ("queue: [out_of_order", "line 2 not valid YAML: expected ',' or ']'"),
    ("work_group: {gemv: 2147483648}", "key 'work_group.gemv' must be below 65536, found 2147483648"),
    ("work_group: {gemv: 9223372036854775808}", "key 'work_group.gemv' must be below 65536"),
    ("memory: {max_alloc_mb: 4294967296}", "key 'memory.max_alloc_mb' must be below 2147483648"),
])
def test_bad_config(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(DpllamaError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize("text, message", [
    ("build_options: " + "[" * 5000 + "]" * 5000, "not a config: nested too deeply"),
    ("memory: {max_alloc_mb: 1" + "0" * 5000 + "}", "not a config: Exceeds the limit"),
    ("name: a\0b", "not valid YAML: unacceptable character #x0000: special characters are not allowed"),
])
def test_config_that_breaks_the_yaml_reader(tmp_path, text, message):
    """Found by tests/test_fuzz.py: a RecursionError, a ValueError, and a two-line message."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DpllamaError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:") and message in str(e.value) and "\n" not in str(e.value)


def test_config_that_is_not_text(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"name: x\n\xff\n")
    with pytest.raises(DpllamaError, match=r"bad\.yaml: not a YAML text file \(byte 0xff at offset 8 is not UTF-8\)"):
        load_config(path)


@pytest.mark.parametrize("work_group", [dict(gemv=4096), dict(gemv=64, reduce=8192), dict(gemv=128, prefill_tokens=64)])
def test_config_beyond_the_device_fails_before_any_launch(queue, work_group):
    """Work-groups too large for the device or the kernel (no device takes 8192 work-items), or local memory
    beyond the device's (the scratch grows with gemv x rows x tiles x tokens: 4096 work-items need 1 MiB in
    decode, gemv 128 with a prompt of 64 prefill tokens 8 MiB; it crashed PoCL's CPU device), fail in one line naming the
    config before any launch."""
    from tests.helpers import random_weights
    from dpllama.model.llama import Llama
    from dpllama.runtime import Queue
    from dpllama.runtime.config import dump_config
    values = dict(queue.config.values, work_group=dict(queue.config["work_group"], **work_group))
    cq = Queue(queue.device, parse_config(dump_config(values), "big.yaml"), out_of_order=False)
    with pytest.raises(DpllamaError, match=r"^big\.yaml: kernel \w+ would need .* lower the work_group sizes"):
        model = Llama(random_weights(32, 48, 1, 4, 2, 40, 72, True, 0), cq)
        model.start([1 + i % 39 for i in range(64)])   # a whole group of prefill tokens: the scratch's largest
        model.feed(64)

    with pytest.raises(DpllamaError, match=r"^nope\.yaml: config file not found \(shipped configs: "
                                           r"amd, cpu, cpu-avx2, cpu-portable, intel-arc, nvidia\)"):
        load_config("nope.yaml")


def test_empty_config_is_the_defaults():
    cfg = parse_config("", "empty.yaml")
    assert cfg.selector == "" and cfg["queue"]["out_of_order"] is True


def test_docs_describe_every_key(repo_root):
    doc = (repo_root / "docs" / "CONFIG.md").read_text()
    keys = [f"{section}.{key}" if isinstance(spec, dict) else section
            for section, spec in SCHEMA.items() for key in (spec if isinstance(spec, dict) else [section])]
    assert [k for k in keys if f"`{k}`" not in doc] == []
