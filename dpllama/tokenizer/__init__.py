"""Tokenizers: llama2.c's tokenizer.bin and GGUF vocabularies (SentencePiece-style and byte-level
BPE), with one interface (see `Tokenizer`), streaming decode and chat templates."""
from dpllama.tokenizer.base import (CHATML_TEMPLATE, StreamDecoder, Tokenizer, check_template_kwargs,
                                    render_chat_template)
from dpllama.tokenizer.gguf import (Gpt2Tokenizer, SpmTokenizer, load_gguf_tokenizer,
                                    tokenizer_from_gguf_fields)
from dpllama.tokenizer.llama2c import Llama2cTokenizer, printable_piece

__all__ = ["CHATML_TEMPLATE", "Gpt2Tokenizer", "Llama2cTokenizer", "SpmTokenizer", "StreamDecoder",
           "Tokenizer", "check_template_kwargs", "load_gguf_tokenizer", "printable_piece", "render_chat_template",
           "tokenizer_from_gguf_fields"]
