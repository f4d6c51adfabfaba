"""The ``cpuinfer`` command: ``run`` (chat), ``bench``, ``bandwidth``, ``estimate``.

Every failure the user can cause ends as one line on stderr (``cpuinfer: ...``) and exit
status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import CpuinferError

# subcommand -> (module with add_arguments/run, help)
SUBCOMMANDS = {
    "run": ("cpuinfer.run_cmd", "chat with a model in the terminal (default: bundled SmolLM2-135M)"),
    "bench": ("tools.bench", "prompt and decode tokens/s, GB/s and %% of memory bandwidth"),
    "bandwidth": ("tools.bandwidth", "measure memory read/copy/triad bandwidth"),
    "estimate": ("tools.estimate", "tokens/s, RAM and context estimate for a model on a machine"),
    "numa": ("cpuinfer.numa_cmd", "NUMA topology, thread/memory placement plan, and --check of a model's pages"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpuinfer", description="CPU-only LLM inference for GGUF models.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_.replace("%%", "%"))
        sp.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(sp)
        except ImportError as e:  # a tool whose optional part is missing still shows in --help
            sp.set_defaults(_import_error=str(e))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1

    def run():
        if getattr(args, "_import_error", None):
            raise CpuinferError(f"{args.command} is unavailable: {args._import_error}")
        return importlib.import_module(args._module).run(args)
    return run_reporting_errors(run)


def tool_main(module, prog: str, description: str, argv: list[str] | None = None) -> int:
    """``python -m tools.X``: the same arguments and error reporting as ``cpuinfer X``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    module.add_arguments(p)
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: module.run(args))


def run_reporting_errors(fn) -> int:
    """Run a command; whatever the user can cause ends as one ``cpuinfer: ...`` line, status 1."""
    try:
        return fn()
    except CpuinferError as e:
        print(f"cpuinfer: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cpuinfer run -p ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"cpuinfer: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except MemoryError:
        print("cpuinfer: out of memory (try a smaller --ctx)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
