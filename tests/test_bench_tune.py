"""`dpllama bench` and `dpllama tune` as a user runs them: what they report and write (never how fast)."""
from __future__ import annotations

import json
import subprocess
import sys

from dpllama.commands import tune
from dpllama.runtime import load_config, select_device
from tests.helpers import llama2c_dir


def test_bench_reports_every_figure(repo_root):
    model = llama2c_dir() / "stories260K.bin"
    r = subprocess.run([sys.executable, "-m", "dpllama.cli", "bench", "-m", str(model), "--prompt", "16", "--gen", "8",
                        "--repeat", "2", "--json", "--quiet", "--profile", "--batch", "1,3"], capture_output=True, text=True,
                       cwd=repo_root)
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
