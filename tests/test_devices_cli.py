"""`dpllama devices` as a user runs it: a separate process, its output and its exit code."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpllama import cli
from dpllama.commands import devices
from dpllama.errors import DpllamaError
from dpllama.runtime import config_device, load_config
from dpllama.runtime.device import NO_PLATFORM_HELP


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A kernel cache of the module's own, so `--check` neither reads nor fills the user's."""
    return tmp_path_factory.mktemp("dpllama-home")


@pytest.fixture
def dpllama(repo_root, home):
    def run(*args, **env):
        environ = {k: v for k, v in os.environ.items() if k != "DPLLAMA_DEVICE"}
        environ.update(DPLLAMA_HOME=str(home), **env)
        return subprocess.run([sys.executable, "-m", "dpllama.cli", "devices", *map(str, args)], cwd=repo_root,
                              env=environ, capture_output=True, text=True, timeout=120)
    return run


@pytest.fixture(scope="module")
def listing(repo_root, home):
    """`dpllama devices --json`, run once for the module."""
    run = subprocess.run([sys.executable, "-m", "dpllama.cli", "devices", "--json"], cwd=repo_root,
                         env={**os.environ, "DPLLAMA_HOME": str(home)}, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def assert_one_line_error(run, *fragments):
    assert run.returncode == 1
    assert run.stderr.startswith("dpllama: error: ") and run.stderr.count("\n") == 1, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr


def test_json(listing):
    selected = [d for d in listing["devices"] if d["selected"]]
    assert len(selected) == 1 and selected[0]["index"] == listing["selected"]
    for d in listing["devices"]:
        assert d["reason"].startswith("selected: " if d["selected"] else "not selected: ")
        assert d["global_mem_bytes"] > 0 and d["compute_units"] > 0 and d["max_work_group_size"] > 0
        assert {"type", "vendor", "driver", "opencl", "fp16", "int8_dot", "subgroups", "out_of_order_queue"} <= d.keys()
        assert d["vnni_asm"] in (True, False)
        if d["vnni_asm"]:       # VNNI the compiler does not target, through inline assembly
            assert d["kernel_path"] in ("avx512-vnni", "avx2-vnni"), d
            assert not {"__AVX512VNNI__", "__AVXVNNI__"} & set(d["isa_macros"]), d
    assert listing["config"] == selected[0]["config"]
    if selected[0]["type"] == "cpu":        # the config follows the kernel path the CPU's compiler targets
        expected = {"avx512": "cpu.yaml", "avx512-vnni": "cpu.yaml", "avx2": "cpu-avx2.yaml",
                    "avx2-vnni": "cpu-avx2.yaml", "portable": "cpu-portable.yaml"}[selected[0]["kernel_path"]]
        assert os.path.basename(listing["config"]) == expected, selected[0]


def test_listing(dpllama, listing):
    run = dpllama()
    assert run.returncode == 0, run.stderr
    for d in listing["devices"]:
        mark = "*" if d["selected"] else " "
        assert f" {mark} device {d['index']}: {d['name']}\n     {d['reason']}\n" in run.stdout
    for label in ("selector", "type, vendor", "driver", "compute", "memory", "features", "config"):
        assert f"\n     {label} " in run.stdout
    assert f"dpllama uses device {listing['selected']}: " in run.stdout
    assert "GiB" in run.stdout or "MiB" in run.stdout


def test_check(dpllama):
    run = dpllama("--check")
    assert run.returncode == 0, run.stderr
    assert "\ncheck passed: axpy on 65536 floats " in run.stdout


def test_check_reports_a_wrong_answer():
    with pytest.raises(DpllamaError, match=r"^check failed: axpy: 1 of 3 values wrong, first at index 1: "
                                           r"expected 2, got 5$"):
        devices.verify("axpy", np.array([1.0, 5.0, 3.0]), np.array([1.0, 2.0, 3.0]), rtol=1e-5, atol=1e-5)


def test_write_config_then_use_it(dpllama, listing, tmp_path):
    path = tmp_path / "mine.yaml"
    run = dpllama("--write-config", path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.endswith(f"wrote {path}\n")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.yaml"]    # no temporary file left behind
    cfg = load_config(path)
    chosen = listing["devices"][listing["selected"]]
    assert cfg["match"]["type"] == chosen["type"] and cfg["match"]["name"] in chosen["name"]
    assert config_device(cfg)[0].index == chosen["index"]
    run = dpllama("--config", path, "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["config"] == str(path)


def test_write_config_into_a_missing_folder(dpllama, tmp_path):
    path = tmp_path / "no-such-folder" / "mine.yaml"
    assert_one_line_error(dpllama("--write-config", path),
                          f"{path}: cannot write config: folder {path.parent} does not exist")


def test_broken_config(dpllama, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("queue:\n  in_order: true\n")
    assert_one_line_error(dpllama("--config", path), f"{path}: unknown key 'queue.in_order'")


def test_config_for_an_absent_device(dpllama, tmp_path):
    path = tmp_path / "absent.yaml"
    path.write_text("match:\n  name: no such device anywhere\n")
    assert_one_line_error(dpllama("--config", path), f"{path}: key 'match' (name~no such device anywhere)")


def test_bad_selector(dpllama):
    assert_one_line_error(dpllama("--device", "tpu"), "device selector term 'tpu'")
    assert_one_line_error(dpllama(DPLLAMA_DEVICE="name~no such device"), "DPLLAMA_DEVICE 'name~no such device'")


def test_no_opencl_platform(dpllama):
    # The ICD loader in pyopencl's wheels (ocl-icd) takes an OCL_ICD_VENDORS that is not a folder as
    # the one ICD to load, and nothing else. An empty folder would not do: the loader also looks in its
    # own folder, where the PoCL wheel puts its ICD. OCL_ICD_FILENAMES is for Khronos' loader.
    run = dpllama(OCL_ICD_VENDORS="/nonexistent", OCL_ICD_FILENAMES="/nonexistent")
    assert_one_line_error(run, NO_PLATFORM_HELP)
    assert "PLATFORM_NOT_FOUND" not in run.stderr


def test_main_exit_codes(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(devices, "run", interrupted)
    assert cli.main(["devices"]) == 130
    with pytest.raises(SystemExit) as e:
        cli.main([])                        # a command is required
    assert e.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_every_package_is_installed(repo_root):
    """pyproject lists packages by hand: a new subpackage missing there works from the checkout but
    not after `pip install .`."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(repo_root).parts) for p in (repo_root / "dpllama").rglob("__init__.py")}
    assert found - listed == set()
