"""`dpllama bench` and `dpllama tune` as a user runs them: what they report and write (never how fast)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dpllama.commands import tune
from dpllama.errors import DpllamaError
from dpllama.runtime import load_config, select_device
from dpllama.runtime.config import defaults, dump_config
from tests.helpers import llama2c_dir


def bench(repo_root, *args):
    model = llama2c_dir() / "stories260K.bin"
    return subprocess.run([sys.executable, "-m", "dpllama.cli", "bench", "-m", str(model), "--quiet", *args],
                          capture_output=True, text=True, cwd=repo_root)


def test_bench_reports_every_figure(repo_root):
    r = bench(repo_root, "--prompt", "16", "--gen", "8", "--repeat", "2", "--json", "--profile", "--batch", "1,3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("prompt_tok_s", "decode_tok_s", "ms_per_token", "weight_gb_s", "first_token_ms"):
        assert out[key] > 0 and out[key + "_spread"] >= 0, key     # median and spread over the repeats
    assert out["first_token_cold_s"] > 0 and out["load_cached_s"] > 0
    # one launch for all the layers where the config runs them in one (the CPU configs: matrix.cl's layers; stories260K's
    # layers run all five phases in one format), else 5 a layer; then the LM head and choose_embed
    fused = select_device()[0].compute_units <= load_config(out["config"])["fuse"]["layer_max_units"]
    assert out["launches_per_token"] == (1 if fused else 5 * out["shape"]["n_layers"]) + 2
    assert out["weight_bytes_per_token"] > 0 and out["repeat"] == 2
    assert set(out["profile"]) >= ({"layers"} if fused else {"gemv_norm_rope_kv", "attention", "gemv_add",
                                                            "gemv_norm_swiglu"}) | {"choose_embed"}
    assert set(out["batched"]) == {"1", "3"} and out["batched"]["1"]["vs_first"] == 1.0
    for b in ("1", "3"):
        assert out["batched"][b]["decode_tok_s"] > 0 and out["batched"][b]["ms_per_step"] > 0


def test_tune_writes_a_config_that_loads(tmp_path, monkeypatch, queue):
    monkeypatch.setattr(tune, "SEARCH", [("decode_tiles", (1, 2), "decode"), ("prefill_tiles", (1, 4), "prefill")])
    monkeypatch.setattr(tune, "MIN_SECONDS", 0.05)
    out = tmp_path / "tuned.yaml"
    found = tune.tune(str(llama2c_dir() / "stories260K.bin"), None, None, str(out), say=lambda s: None)
    cfg = load_config(out)
    assert cfg["work_group"]["decode_tiles"] == found["decode_tiles"]["value"] in (1, 2)
    assert cfg["work_group"]["prefill_tiles"] == found["prefill_tiles"]["value"] in (1, 4)
    assert cfg["match"]["type"] == queue.device.type and cfg["match"]["name"] in queue.device.name
    assert "tuned on stories260K.bin" in out.read_text()


def test_bench_context_shorter_than_a_prefill_pass(repo_root):
    """--prompt + --gen below a prefill pass and a token (9 tokens here): the cold start's prompt fits in it too."""
    r = bench(repo_root, "--prompt", "4", "--gen", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["first_token_cold_s"] > 0


def test_bench_refuses_more_sequences_than_the_device_holds(repo_root):
    r = bench(repo_root, "--prompt", "8", "--gen", "8", "--batch", "999999")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("dpllama: error: 999999 sequences (--batch) of 16 tokens (--prompt + --gen) "
                               "need "), r.stderr


def test_tune_checks_where_it_writes_before_tuning(tmp_path, monkeypatch):
    """Onto an input (the model, the tokenizer, the config it starts from), or into a missing folder: refused before
    any measuring (minutes), the inputs intact."""
    monkeypatch.setattr(tune, "measure", lambda *args: pytest.fail("tuned before checking where the config goes"))
    d = llama2c_dir()
    model, tok = (shutil.copy(d / n, tmp_path) for n in ("stories260K.bin", "tok512.bin"))
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(defaults()))
    before = {p: open(p, "rb").read() for p in (model, tok, config)}
    for out, message in [(model, "is the input"), (tok, "is the input"), (config, "is the input"),
                         (tmp_path / "no" / "c.yaml", "cannot write config: folder")]:
        with pytest.raises(DpllamaError, match=f"^{out}: {message}"):
            tune.tune(model, None, str(config), str(out), say=lambda s: None, tokenizer=tok)
    assert {p: open(p, "rb").read() for p in (model, tok, config)} == before
