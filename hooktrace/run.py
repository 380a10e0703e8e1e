"""``python -m hooktrace.run [-m MODULE | SCRIPT] [ARGS]``: run a script with the agent attached.

The per-process entry point: ``hooktrace run --nproc-per-node N`` starts torchrun with
``-m hooktrace.run``, and users of their own torchrun launch ``torchrun ... -m hooktrace.run
train.py``. Configuration comes from ``HOOKTRACE_*`` environment variables.
"""

from __future__ import annotations

import os
import sys

from hooktrace import envvars
from hooktrace.config import Config
from hooktrace.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    module = False
    if args[:1] == ["-m"]:
        module, args = True, args[1:]
    if not args:
        print("usage: python -m hooktrace.run [-m MODULE | SCRIPT] [ARGS...]", file=sys.stderr)
        return 2
    target, rest = args[0], args[1:]
    if not module and not os.path.isfile(target):
        print(f"hooktrace: can't open file {target!r}: no such file; check the script path", file=sys.stderr)
        return 2
    try:
        config = Config.resolve()
    except ConfigError as exc:
        print(f"hooktrace: error: {exc}", file=sys.stderr)
        return 2
    from hooktrace.cli.launch import run_target

    quiet = envvars.quiet_summary()
    return run_target(config, target, rest, module=module, print_summary=not quiet)


if __name__ == "__main__":
    sys.exit(main())
