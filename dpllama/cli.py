"""The `dpllama` command: parses arguments and dispatches to one function per subcommand.

Each subcommand is an entry in COMMANDS: a function that adds its arguments to its parser and a
function that runs it. The work itself lives in modules (dpllama/devices.py for `devices`), so this
file stays a table; heavy imports (pyopencl, numpy) happen inside the command functions, which keeps
`dpllama --help` fast.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from dpllama import __version__
from dpllama.errors import DpllamaError
from dpllama.fileio import remove_live

SELECTOR_HELP = ("device selector: cpu, gpu, gpu:1, a device number, platform=NAME, vendor=NAME, name~TEXT, "
                 "comma-separated terms all must hold (default: $DPLLAMA_DEVICE, else the best device)")


def add_devices(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="SELECTOR", help=SELECTOR_HELP)
    p.add_argument("--config", metavar="PATH", help="YAML device config (or a shipped config's name: cpu, "
                   "nvidia, amd, intel-arc); its `match` section picks the device")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--write-config", metavar="PATH",
                   help="write a YAML config for the selected device, to edit and pass as --config")
    p.add_argument("--check", action="store_true",
                   help="run small kernels on the selected device and compare with NumPy")


def cmd_devices(args: argparse.Namespace) -> int:
    from dpllama import devices
    return devices.run(args.device, args.config, as_json=args.json, write_path=args.write_config,
                       run_check=args.check)


def add_model(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-m", "--model", required=required,
                   help="model: a llama2.c .bin, a GGUF (llama.cpp's or dpllama's quantized), or a known name "
                        "(smollm2-135m, fetched on first use)")
    p.add_argument("-z", "--tokenizer", help="llama2.c tokenizer.bin (default: tokenizer.bin beside the model); "
                   "GGUF models carry their own")


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="SELECTOR", help=SELECTOR_HELP)
    p.add_argument("--config", metavar="PATH", help="YAML device config, or a shipped one's name")
    p.add_argument("-c", "--ctx", "--ctx-size", type=int, default=None, metavar="N",
                   help="context length to allocate (default: the model's)")


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


def load_llm(args: argparse.Namespace):
    from dpllama.llm import load
    if args.ctx is not None and args.ctx < 1:
        raise DpllamaError(f"--ctx must be at least 1, found {args.ctx}")
    return load(args.model, args.tokenizer, args.device, args.config, args.ctx)


def add_generate(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("-p", "-i", "--prompt", default="", help="the text to continue (llama2.c's -i)")
    p.add_argument("-n", "--steps", type=int, default=256,
                   help="positions to run, prompt included, as llama2.c's -n; 0 = the whole context (default 256)")
    p.add_argument("--special", action="store_true", help="parse special tokens such as <|im_start|> in the prompt")
    add_sampling(p, temperature=1.0)
    add_device(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from dpllama.generate import check_steps
    steps = check_steps(args.steps, "-n")
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
    out = sys.stdout
    stream = llm.stream(ids, steps, sampler)
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    print(timings(stream.stats), file=sys.stderr)
    return 0


def timings(st) -> str:
    """The prompt's and the generation's speed (a generate.Stats), as llama.cpp reports them (prompt: up to the
    first new token)."""
    line = f"prompt: {st.prompt_tokens} tokens, {st.prompt_tok_s:.1f} tok/s"
    if st.generated_tokens > 1:
        line += f"; generated: {st.generated_tokens} tokens, achieved tok/s: {st.decode_tok_s:.2f}"
    return line


def add_chat(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own, if any)")
    p.add_argument("-n", "--max-reply", type=int, default=512, help="longest reply in tokens (default 512)")
    add_sampling(p, temperature=0.7)
    add_device(p)


def cmd_chat(args: argparse.Namespace) -> int:
    from dpllama.chat import repl
    from dpllama.generate import check_steps
    max_reply = check_steps(args.max_reply, "-n")
    sampler = sampler_from(args)
    llm = load_llm(args)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # Ctrl-C stops a reply (chat.py), not the chat
    repl(llm, sampler, args.system, max_reply)
    return 0


def add_tokenize(p: argparse.ArgumentParser) -> None:
    add_model(p, required=False)
    p.add_argument("text", help="the text to encode")
    p.add_argument("--no-bos", action="store_true", help="do not add BOS")
    p.add_argument("--special", action="store_true", help="parse special tokens")
    p.add_argument("--pieces", action="store_true", help="print each id with its piece")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from dpllama.loaders import tokenizer_only
    tok = tokenizer_only(args.model, args.tokenizer)
    ids = tok.encode(args.text, bos=False if args.no_bos else None, parse_special=args.special)
    if args.pieces:
        for t in ids:
            print(t, repr(tok.token_bytes(t).decode("utf-8", "replace")))
    else:
        print(" ".join(map(str, ids)))
    return 0


def add_quantize(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="llama2.c .bin or GGUF (or a known model name)")
    p.add_argument("output", help="dpllama GGUF to write")
    p.add_argument("-z", "--tokenizer", help="llama2.c tokenizer.bin to store in the output (llama2.c inputs)")
    p.add_argument("--group", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    p.add_argument("--scheme", default="asym", help="asym (scale and min per group, default) or sym (scale only)")
    p.add_argument("--keep-8bit", default="tok_embeddings,output", metavar="NAMES",
                   help="tensors kept in 8 bits: tok_embeddings, output, both comma-separated "
                        "(default), or none")


def cmd_quantize(args: argparse.Namespace) -> int:
    from dpllama.quantize import run
    keep = () if args.keep_8bit in ("", "none") else tuple(n.strip() for n in args.keep_8bit.split(","))
    run(args.input, args.output, args.tokenizer, args.group, args.scheme, keep)
    return 0


def add_pull(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="a known model: smollm2-135m")


def cmd_pull(args: argparse.Namespace) -> int:
    from dpllama.hub import pull
    print(pull(args.name, progress=lambda s: print(f"dpllama: {s}", file=sys.stderr)))
    return 0


def add_bench(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    p.add_argument("--gen", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--repeat", type=int, default=1, help="runs; the median and the spread are reported")
    p.add_argument("--profile", action="store_true", help="kernel time by kernel, from profiling events")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--device", metavar="SELECTOR", help=SELECTOR_HELP)
    p.add_argument("--config", metavar="PATH", help="YAML device config, or a shipped one's name")


def cmd_bench(args: argparse.Namespace) -> int:
    from dpllama import bench
    if args.prompt < 1 or args.gen < 2 or args.repeat < 1:
        raise DpllamaError(f"need --prompt >= 1, --gen >= 2, --repeat >= 1; found {args.prompt}, {args.gen}, "
                           f"{args.repeat}")
    bench.main(args)
    return 0


def add_tune(p: argparse.ArgumentParser) -> None:
    add_model(p)
    p.add_argument("--write-config", metavar="PATH", required=True, help="where to write the tuned config")
    p.add_argument("--device", metavar="SELECTOR", help=SELECTOR_HELP)
    p.add_argument("--config", metavar="PATH", help="config to start from (default: the device's shipped one)")


def cmd_tune(args: argparse.Namespace) -> int:
    from dpllama import tune
    tune.main(args)
    return 0


# name -> (help, add arguments, run)
COMMANDS = {
    "devices": ("list OpenCL devices, show which one dpllama uses and why, check it works",
                add_devices, cmd_devices),
    "generate": ("continue a prompt, streaming tokens (llama2.c's run flags)", add_generate, cmd_generate),
    "chat": ("chat with a model in its chat template", add_chat, cmd_chat),
    "tokenize": ("print the token ids of a text", add_tokenize, cmd_tokenize),
    "quantize": ("quantize a model to int4 (dpllama GGUF)", add_quantize, cmd_quantize),
    "pull": ("download a known model into the cache", add_pull, cmd_pull),
    "bench": ("measure prompt processing and decode speed", add_bench, cmd_bench),
    "tune": ("search work-group sizes on this device and write the fastest config", add_tune, cmd_tune),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpllama", description="Llama-family LLM inference on any OpenCL device.")
    p.add_argument("--version", action="version", version=f"dpllama {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sp)
        sp.set_defaults(run=run, command_parser=sp)
    return p


def terminated(signum, frame):
    """SIGTERM (kill's default) unwinds like Ctrl-C, so that temporaries are removed and child processes
    (pull's pip) killed on the way out, instead of Python's default of dying on the spot."""
    sys.exit(128 + signum)


def interrupted(signum, frame):
    """Ctrl-C: one line and exit 130, at once. A KeyboardInterrupt would land wherever Python happens to be:
    inside a native module's initialisation (PyOpenCL's then aborts the process), in a finalizer (Python prints
    "Exception ignored" and carries on), in argparse's imports. Nothing needs unwinding: files are written whole
    or not at all, this process's temporaries are removed here (fileio.LIVE), and pull's pip dies with dpllama."""
    remove_live()
    os.write(2, b"\ndpllama: interrupted\n")
    os._exit(130)


def main(argv: list[str] | None = None) -> int:
    """Run the command in `argv` (default: the process's own arguments) and return its exit status. Ctrl-C is
    `interrupted` (chat takes it back, to stop a reply). Called as the program (`argv` None), it ignores Ctrl-C
    once the command is over: its work is done, and it would otherwise land in the interpreter's teardown."""
    signal.signal(signal.SIGTERM, terminated)
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        args, unknown = parser().parse_known_args(argv)
        if unknown:     # with the subcommand's usage, not the top level's, which does not show its options
            args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args.run(args)
    except DpllamaError as e:
        print(f"dpllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # chat's, at its start or end
        print("\ndpllama: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN if argv is None else previous)


if __name__ == "__main__":
    sys.exit(main())
