"""`dpllama generate`: continue a prompt, streaming tokens (llama2.c's run flags)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpllama.commands.options import add_activation_bits, add_device, add_model, add_sampling, load_llm, sampler_from
from dpllama.constrain import SchemaError, grammar
from dpllama.errors import DpllamaError
from dpllama.generate import Stats, check_reach, check_steps


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("-p", "-i", "--prompt", default="", help="the text to continue (llama2.c's -i)")
    p.add_argument("-n", "--steps", type=int, default=256,
                   help="positions to run, prompt included, as llama2.c's -n; 0 = the whole context (default 256)")
    p.add_argument("--special", action="store_true", help="parse special tokens such as <|im_start|> in the prompt")
    p.add_argument("--json", action="store_true",
                   help="JSON mode: the continuation is one JSON object, ending as it closes (unless -n ends first)")
    p.add_argument("-j", "--json-schema", metavar="SCHEMA",
                   help="the continuation is one JSON object that this JSON schema admits (its text, or a file "
                        "holding it), as llama.cpp's --json-schema: properties in the schema's order")
    add_sampling(p, temperature=1.0)
    add_device(p)
    add_activation_bits(p)


def json_schema(arg: str) -> dict:
    """--json-schema's schema: the argument is its JSON text where it starts with "{", else a file's name."""
    text, where = arg, "--json-schema"
    if not arg.lstrip().startswith("{"):
        where = arg
        try:
            text = Path(arg).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DpllamaError(f"--json-schema: cannot read {arg}: {getattr(e, 'strerror', None) or e}") from None
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DpllamaError(f"{where}: the JSON schema is no JSON: {e}") from None
    if not isinstance(schema, dict):
        raise DpllamaError(f"{where}: a JSON schema is an object, found {type(schema).__name__}")
    try:
        grammar(schema)
    except SchemaError as e:
        raise DpllamaError(f"{where}: {e}") from None
    return schema


def run(args: argparse.Namespace) -> int:
    steps = check_steps(args.steps, "-n")
    schema = None if args.json_schema is None else json_schema(args.json_schema)
    sampler = sampler_from(args)
    llm = load_llm(args)
    ctx = llm.model.seq_len
    if steps == 0 or steps > ctx:
        if steps > ctx:
            print(f"dpllama: -n {steps} is beyond the context of {ctx} tokens; running {ctx}", file=sys.stderr)
        steps = ctx
    ids = llm.encode(args.prompt, parse_special=args.special)
    if len(ids) > ctx:
        raise DpllamaError(f"the prompt is {len(ids)} tokens, more than the context of {ctx}")
    check_reach(steps, len(ids), "-n")
    out = sys.stdout
    stream = llm.stream(ids, steps, sampler, json=schema if schema is not None else args.json)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    print(timings(stream.stats), file=sys.stderr)
    return 0


def timings(st: Stats) -> str:
    """The prompt's and the generation's speed, as llama.cpp reports them (prompt: up to the first new token)."""
    line = f"prompt: {st.prompt_tokens} tokens, {st.prompt_tok_s:.1f} tok/s"
    if st.generated_tokens > 1:
        line += f"; generated: {st.generated_tokens} tokens, achieved tok/s: {st.decode_tok_s:.2f}"
    return line
