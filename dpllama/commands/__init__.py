"""The `dpllama` subcommands, a module each: `add_arguments(parser)` declares its options and `run(args)` does
the work and returns the exit status. dpllama/cli.py imports a command's module only when that command runs
or shows its help, so one command's imports (pyopencl, NumPy) never slow another, or `dpllama --help`.
"""
