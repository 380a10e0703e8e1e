"""``hooktrace run --nproc-per-node N``: delegate to torchrun, each worker under ``hooktrace.run``.

The launcher fixes the run id and the output directory for all workers through ``HOOKTRACE_*``
variables, runs ``python -m torch.distributed.run [torchrun options] -m hooktrace.run SCRIPT ARGS``,
passes its exit code through, and prints the summary merged over the node's ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from hooktrace import envvars
from hooktrace.config import Config

TORCHRUN_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--nproc-per-node", {"type": str, "help": "torchrun: workers per node (e.g. 2, gpu, auto)."}),
    ("--nnodes", {"type": str, "help": "torchrun: number of nodes, or MIN:MAX."}),
    ("--node-rank", {"type": int, "help": "torchrun: rank of this node."}),
    ("--rdzv-backend", {"type": str, "help": "torchrun: rendezvous backend."}),
    ("--rdzv-endpoint", {"type": str, "help": "torchrun: rendezvous endpoint."}),
    ("--rdzv-id", {"type": str, "help": "torchrun: rendezvous (job) id."}),
    ("--master-addr", {"type": str, "help": "torchrun: master address."}),
    ("--master-port", {"type": int, "help": "torchrun: master port."}),
    ("--max-restarts", {"type": int, "help": "torchrun: restarts before failing."}),
]
TORCHRUN_KEYS = frozenset(flag[2:].replace("-", "_") for flag, _ in TORCHRUN_OPTIONS)
"""The click parameter names of ``TORCHRUN_OPTIONS``."""


def torchrun_argv(torchrun: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in torchrun.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def config_env(config: Config) -> dict[str, str]:
    """The HOOKTRACE_* variables that give every worker this exact config."""
    env: dict[str, str] = {}
    for field, name in envvars.CONFIG_ENV.items():
        value = getattr(config, field)
        if value is None:
            continue
        env[name] = ",".join(value) if isinstance(value, tuple) else str(value)
    env[envvars.HOOKTRACE_OUT] = os.path.abspath(config.out_dir())
    return env


def launch_distributed(config: Config, target: str, args: list[str], *, module: bool, torchrun: dict[str, Any]) -> int:
    env = {**os.environ, **config_env(config), envvars.HOOKTRACE_QUIET_SUMMARY: "1"}
    entry = ["-m", "hooktrace.run"] + (["-m", target] if module else [target])
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_argv(torchrun), *entry, *args]
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum: int, frame: object) -> None:
        proc.send_signal(signum)

    # Ctrl-C reaches torchrun and the workers through the terminal's process group already;
    # SIGTERM (from a scheduler) is sent to this process only, so pass it on.
    old_int = signal.signal(signal.SIGINT, lambda signum, frame: None)
    old_term = signal.signal(signal.SIGTERM, forward)
    try:
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    out_dir = env[envvars.HOOKTRACE_OUT]
    from hooktrace.export.files import write_json_atomic
    from hooktrace.summary import RunSummary
    from hooktrace.summary_builder import merge_dir

    if os.path.isdir(out_dir):
        merged = merge_dir(out_dir, check_gradients=True)
        if merged:
            write_json_atomic(os.path.join(out_dir, "summary.json"), merged)
            print(RunSummary.from_dict(merged).render(), file=sys.stderr)
    return code
