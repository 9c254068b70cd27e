"""Write llama.cpp's logits for tests/helpers.py's tiny models (LLAMA_CPP_MODELS: a Qwen3, one with YaRN, a llama
with linear RoPE scaling, a Phi-3) to tests/oracles/NAME_llamacpp.npz, the oracles tests/test_forward.py holds
dpllama to.
Needs llama-cpp-python (`pip install llama-cpp-python`, a native build of several minutes; on a CPU with AMX, built
without it: docs/PERFORMANCE.md), which the tests do not:

    PYTHONPATH=. python tests/oracles/make_llamacpp.py [NAME ...]     # all of them, or the ones named
"""
from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import LLAMA_CPP_MODELS, ORACLES, tiny_qwen3  # noqa: E402

# a prompt of 40 tokens: every byte token's row of the embedding is as good as another's
TOKENS = np.random.default_rng(11).integers(4, 260, 40).tolist()


def main() -> None:
    import llama_cpp
    for name in sys.argv[1:] or LLAMA_CPP_MODELS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.gguf"
            tiny_qwen3(path, name=name)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=2, seed=0,
                                  verbose=False)
            llm.eval(TOKENS)
            logits = np.array(llm.scores[:len(TOKENS)], np.float32)
        out = ORACLES / f"{name}_llamacpp.npz"
        np.savez_compressed(out, tokens=np.array(TOKENS, np.int32), logits=logits, gguf_sha256=digest,
                            llama_cpp_python=llama_cpp.__version__)
        print(f"{out}: logits {logits.shape} of llama-cpp-python {llama_cpp.__version__}, GGUF sha256 "
              f"{digest[:16]}...")


if __name__ == "__main__":
    main()
