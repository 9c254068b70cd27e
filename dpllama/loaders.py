"""A model's files without a device: its weights (`load_weights`) and its tokenizer, from the model, beside it or
given (`load_tokenizer`, and `tokenizer_only` without the weights, for `dpllama tokenize`). Nothing here
imports the runtime, so a tokenizer costs no OpenCL."""
from __future__ import annotations

import os
from pathlib import Path

from dpllama.errors import DpllamaError
from dpllama.fileio import check_input
from dpllama.formats import GGUF_MAGIC
from dpllama.hub import resolve_model
from dpllama.model.weights import Weights
from dpllama.tokenizer import Llama2cTokenizer, Tokenizer, load_gguf_tokenizer, tokenizer_from_gguf_fields


def is_gguf(path: str | os.PathLike) -> bool:
    """By its magic; a file named .gguf counts too, so that load_gguf tells it when it is not one."""
    check_input(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:    # a file that stat calls regular may still refuse reads (/proc/self/mem)
        raise DpllamaError(f"{path}: cannot read: {e.strerror}") from None
    return magic == GGUF_MAGIC or Path(path).suffix.lower() == ".gguf"


def load_weights(path: str | os.PathLike) -> Weights:
    if is_gguf(path):
        from dpllama.model.gguf import load_gguf
        return load_gguf(path)
    from dpllama.model.llama2c import load_llama2c
    return load_llama2c(path)


def load_tokenizer(weights: Weights, tokenizer: str | None, model_path: Path) -> Tokenizer:
    fields = weights.meta.get("tokenizer_fields")
    if tokenizer is None and fields:
        tok = tokenizer_from_gguf_fields(fields, str(model_path))
        if tok.vocab_size > weights.config.vocab_size:     # its ids past the embedding table (fewer is padding)
            raise DpllamaError(f"{model_path}: tokenizer.ggml.tokens has {tok.vocab_size} tokens, more than the "
                               f"{weights.config.vocab_size} rows of token_embd")
        return tok
    return llama2c_model_tokenizer(tokenizer, weights.config.vocab_size, model_path)


def llama2c_model_tokenizer(tokenizer: str | None, vocab_size: int, model_path: Path) -> Tokenizer:
    """The tokenizer of a model that has none inside (llama2.c's): `tokenizer`, else tokenizer.bin beside the
    model, as llama2.c's run does; either must have the model's vocabulary."""
    if tokenizer is None:
        beside = model_path.parent / "tokenizer.bin"
        if not beside.is_file():
            raise DpllamaError(f"{model_path}: a llama2.c model has no tokenizer inside, and none is beside it "
                               f"({beside}): give one with -z")
        try:
            return llama2c_model_tokenizer(str(beside), vocab_size, model_path)
        except DpllamaError as e:
            raise DpllamaError(f"{model_path}: no tokenizer given, and the one beside the model does not fit "
                               f"({e}): give the model's with -z") from None
    if Path(tokenizer).suffix == ".gguf":
        tok = load_gguf_tokenizer(tokenizer)
    else:
        tok = Llama2cTokenizer(tokenizer, vocab_size)
    if tok.vocab_size != vocab_size:
        raise DpllamaError(f"{tokenizer}: tokenizer has {tok.vocab_size} tokens but model {model_path} "
                           f"has vocab_size {vocab_size}")
    return tok


def tokenizer_only(model: str | None, tokenizer: str | None) -> Tokenizer:
    """A tokenizer without loading weights: a llama2.c tokenizer.bin, a GGUF model's own, or a llama2.c
    model's (beside it, checked against its header)."""
    if tokenizer is not None and Path(tokenizer).suffix != ".gguf":
        return Llama2cTokenizer(tokenizer)
    if tokenizer is None and model is None:
        raise DpllamaError("give a tokenizer (-z TOKENIZER.bin) or a model (-m MODEL)")
    path = resolve_model(model if tokenizer is None else tokenizer)
    if tokenizer is None and not is_gguf(path):
        from dpllama.model.llama2c import read_config
        return llama2c_model_tokenizer(None, read_config(path).vocab_size, path)
    return load_gguf_tokenizer(path)
