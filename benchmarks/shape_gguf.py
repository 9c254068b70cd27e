"""A GGUF of random weights in the shape of a model this machine cannot download, for `dpllama bench` and
benchmarks/compare.py (dpllama against llama.cpp on the same file): speed does not depend on the values.

    PYTHONPATH=. python benchmarks/shape_gguf.py qwen3-0.6b /tmp/qwen3-0.6b-q8_0.gguf [--type Q8_0]
    PYTHONPATH=. python benchmarks/compare.py --model /tmp/qwen3-0.6b-q8_0.gguf --prompt 256 --gen 64

Every matrix is of `--type` (Q8_0, Q4_0 and F16 quantized from random values by gguf-py; K-quants and IQ4 as random
blocks of weights of the same size, tests/helpers.gguf_data), norms and vectors f32, and the vocabulary a
byte-level BPE one of the model's size (its 256 byte tokens, one merge, then filler tokens): both engines load
it, neither is asked to tokenize text.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gguf import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpllama.model.gguf import layer_tensor_name  # noqa: E402
from dpllama.model.weights import MATRICES  # noqa: E402
from tests.helpers import random_weights, write_test_gguf  # noqa: E402
from tests.test_tokenizer import byte_chars  # noqa: E402

QWEN3 = dict(arch="qwen3", rope_neox=True, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, key_length=128,
             n_kv_heads=8, seq_len=40960, shared=True)
SHAPES = {      # as the models' config.json gives them
    "qwen3-0.6b": dict(dim=1024, hidden=3072, n_layers=28, n_heads=16, vocab=151936, **QWEN3),
    "qwen3-1.7b": dict(dim=2048, hidden=6144, n_layers=28, n_heads=16, vocab=151936, **QWEN3),
}


def tokenizer(vocab: int) -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_chars() + ["Ġt"] + [f"filler{i}" for i in range(vocab - 260)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["Ġ t"],      # llama.cpp refuses a BPE vocabulary without merges
            "tokenizer.ggml.token_type": [3] * 3 + [1] * (vocab - 3),
            "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=SHAPES)
    ap.add_argument("out", type=Path)
    ap.add_argument("--type", default="Q8_0", help="every matrix's GGUF type (default Q8_0)")
    args = ap.parse_args()
    ggml_type = GGMLQuantizationType[args.type]
    shape = SHAPES[args.shape]
    w = random_weights(**shape)
    types = {"token_embd.weight": ggml_type, **{layer_tensor_name(i, m): ggml_type
                                                for i in range(shape["n_layers"]) for m in MATRICES}}
    write_test_gguf(args.out, w, types=types, tokenizer=tokenizer(shape["vocab"]))
    print(f"{args.out}: {args.shape}, {args.type}, {args.out.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
