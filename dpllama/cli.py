"""The `dpllama` command: parses arguments and dispatches to one function per subcommand.

Each subcommand is an entry in COMMANDS: a function that adds its arguments to its parser and a
function that runs it. The work itself lives in modules (dpllama/devices.py for `devices`), so this
file stays a table; heavy imports (pyopencl, numpy) happen inside the command functions, which keeps
`dpllama --help` fast.
"""
from __future__ import annotations

import argparse
import sys

from dpllama import __version__
from dpllama.errors import DpllamaError

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


# name -> (help, add arguments, run); the lead adds generate, chat, tokenize, quantize, pull, bench here
COMMANDS = {
    "devices": ("list OpenCL devices, show which one dpllama uses and why, check it works",
                add_devices, cmd_devices),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpllama", description="Llama-family LLM inference on any OpenCL device.")
    p.add_argument("--version", action="version", version=f"dpllama {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(sp)
        sp.set_defaults(run=run)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except DpllamaError as e:
        print(f"dpllama: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dpllama: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
