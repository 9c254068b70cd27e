"""Options several commands share, each declared once."""
from __future__ import annotations

import argparse
import json
import sys

from dpllama.errors import DpllamaError
from dpllama.model.weights import ACTIVATION_BITS, KV_TYPES
from dpllama.tokenizer import check_template_kwargs

SELECTOR_HELP = ("device selector: cpu, gpu, gpu:1, a device number, platform=NAME, vendor=NAME, name~TEXT, "
                 "isa=avx2, comma-separated terms all must hold (default: $DPLLAMA_DEVICE, else the best device)")
CONFIG_HELP = ("YAML device config, or a shipped config's name (cpu, cpu-avx2, cpu-portable, nvidia, amd, intel-arc); "
               "its `match` section picks the device (default: $DPLLAMA_CONFIG, else the shipped one that matches)")


def add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required,
                   help="model: a llama2.c .bin, a GGUF (llama.cpp's or dpllama's quantized), or a known name "
                        "(smollm2-135m, fetched on first use)")
    p.add_argument("-z", "--tokenizer", help="llama2.c tokenizer.bin (default: tokenizer.bin beside the model); "
                   "GGUF models carry their own")


def add_device(p: argparse.ArgumentParser, ctx: bool = True, config_help: str = CONFIG_HELP) -> None:
    """--device and --config, and with `ctx` the context length to allocate."""
    p.add_argument("--device", metavar="SELECTOR", help=SELECTOR_HELP)
    p.add_argument("--config", metavar="PATH", help=config_help)
    if ctx:
        p.add_argument("-c", "--ctx", "--ctx-size", type=int, default=None, metavar="N",
                       help="context length to allocate (default: the model's, at most 2 GiB of KV cache and "
                            "scratch)")


def activation_bits(text: str) -> int:
    """--activation-bits' type: argparse checks a type, unlike choices, on a default from the environment too."""
    if text.strip() not in map(str, ACTIVATION_BITS):
        raise argparse.ArgumentTypeError(f"must be {' or '.join(map(str, ACTIVATION_BITS))}, found {text!r}")
    return int(text)


def one_of(*values: str):
    """The type of an option that takes one of `values` (a type, not choices, as activation_bits)."""
    def check(text: str) -> str:
        if text.strip() not in values:
            raise argparse.ArgumentTypeError(f"must be {', '.join(values[:-1])} or {values[-1]}, found {text!r}")
        return text.strip()
    return check


cache_type = one_of(*KV_TYPES)


def add_activation_bits(p: argparse.ArgumentParser) -> None:
    """--activation-bits and --cache-type: the numerics of a model's matrices and of its KV cache."""
    p.add_argument("--activation-bits", type=activation_bits, default=16, metavar="{16,8}",
                   help="how int4 and int5 matrices take their input: as 16-bit integers (default: logits within "
                        "~0.01 of float32 math's) or as bytes, llama.cpp's numerics (prompts 1.2-1.3x faster, "
                        "logits further from float32 math's: docs/QUALITY.md)")
    p.add_argument("--cache-type", type=cache_type, default="f16", metavar="{f16,f32}",
                   help="the KV cache's values: fp16 (default, llama.cpp's; half the memory and bytes read per "
                        "step) or float32 (float32 math end to end)")


class Temperature(argparse.Action):
    """-t/--temperature/--temp. -t is llama2.c's temperature, but `-t 4` reads like llama.cpp's thread count:
    a whole number from 2 up written after -t gets a warning (after --temperature or --temp it is meant)."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            t = float(value)
        except ValueError:
            raise argparse.ArgumentError(self, f"invalid float value: {value!r}") from None
        if option_string == "-t" and value.isdigit() and int(value) >= 2:
            print(f"dpllama: warning: -t {value} is the sampling temperature (llama2.c's -t), not a thread count "
                  f"(llama.cpp's -t); --temperature {value} says it without this warning", file=sys.stderr)
        setattr(namespace, self.dest, t)


def add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("-t", "--temperature", "--temp", action=Temperature, default=temperature, metavar="T",
                   help=f"sampling temperature, 0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling cut, 0 or 1 = off (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="penalty for tokens among the last --repeat-last-n, 1 = off (default 1.0)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="window of --repeat-penalty: 0 off, -1 the whole history (default 64)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: from the clock)")


def sampler_from(args: argparse.Namespace):
    """The sampler, which checks its arguments: called before the model loads, so that a bad one fails at once."""
    import time
    from dpllama.generate import Sampler
    seed = args.seed if args.seed is not None else time.time_ns()
    return Sampler(args.temperature, args.top_p, args.top_k, args.repeat_penalty, args.repeat_last_n, seed)


def add_template_kwargs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chat-template-kwargs", metavar="JSON",
                   help="extra variables of the chat template, a JSON object (llama.cpp's): "
                        "'{\"enable_thinking\": false}' has Qwen3 answer without thinking first")


def template_kwargs_from(args: argparse.Namespace) -> dict:
    """--chat-template-kwargs' object, checked before the model loads: a DpllamaError's one line, as check_ctx's,
    where an argparse type's error comes after the usage."""
    text = args.chat_template_kwargs
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except ValueError as e:
        raise DpllamaError(f"--chat-template-kwargs must be a JSON object, found {text!r} (not JSON: {e})") from None
    if not isinstance(kwargs, dict):
        raise DpllamaError(f"--chat-template-kwargs must be a JSON object, found {text!r}")
    try:
        return check_template_kwargs(kwargs)
    except DpllamaError as e:
        raise DpllamaError(f"--chat-template-kwargs {text!r}: {e}") from None


def check_ctx(args: argparse.Namespace) -> None:
    if args.ctx is not None and args.ctx < 1:
        raise DpllamaError(f"--ctx must be at least 1, found {args.ctx}")


def load_llm(args: argparse.Namespace, slots: int = 1, chunk: int | None = None, check=None):
    """dpllama.llm.load with the command line's model, tokenizer, device, config, --ctx, --activation-bits and
    --cache-type (`check`: load's)."""
    from dpllama.llm import load
    check_ctx(args)
    return load(args.model, args.tokenizer, args.device, args.config, args.ctx, slots, chunk, check,
                args.activation_bits, args.cache_type)
