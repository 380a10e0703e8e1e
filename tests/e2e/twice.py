"""Run one script twice, under plain `python` and under `hooktrace run`, to compare what each printed
and wrote.

Each run has its own working directory (``<tmp_path>/python``, ``<tmp_path>/hooktrace``), so a
script's relative paths (``--save model.pt``) land apart; hooktrace writes its files to
``<tmp_path>/hooktrace-out``. Scripts run with one thread, offline, with a fixed hash seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import read_steps

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tests" / "scripts"

SCRIPT_ENV = {
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOOKTRACE_", "OTEL_"))}
    return {**env, **SCRIPT_ENV}


def _failure(name: str, result: subprocess.CompletedProcess[str]) -> str:
    return f"{name} exited with {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"


@dataclass
class Runs:
    """The two runs of one script: their processes, working directories and hooktrace's files."""

    plain: subprocess.CompletedProcess[str]
    traced: subprocess.CompletedProcess[str]
    plain_dir: Path
    traced_dir: Path
    out: Path

    def assert_both_succeeded(self) -> None:
        assert self.plain.returncode == 0, _failure("python", self.plain)
        assert self.traced.returncode == 0, _failure("hooktrace run", self.traced)

    def assert_same_stdout(self) -> None:
        """Both exited 0 and printed the same bytes (the scripts print their losses with repr)."""
        self.assert_both_succeeded()
        assert self.plain.stdout, "the script printed nothing to compare"
        assert self.traced.stdout == self.plain.stdout

    def steps(self) -> list[dict[str, Any]]:
        return read_steps(self.out)

    def summary(self) -> dict[str, Any]:
        return json.loads((self.out / "summary.json").read_text())  # type: ignore[no-any-return]


def run_both(
    tmp_path: Path, script: Path, *args: str, hooktrace_args: tuple[str, ...] = (), timeout: float = 180
) -> Runs:
    """Run ``script args`` under python, then under ``hooktrace run --metrics-port 0 --out ...``."""
    plain_dir, traced_dir, out = tmp_path / "python", tmp_path / "hooktrace", tmp_path / "hooktrace-out"
    plain_dir.mkdir()
    traced_dir.mkdir()
    common: dict[str, Any] = {"capture_output": True, "text": True, "timeout": timeout, "env": _env()}
    plain = subprocess.run([sys.executable, str(script), *args], cwd=plain_dir, **common)
    traced = subprocess.run(
        [
            sys.executable, "-m", "hooktrace.cli.main", "run", "--metrics-port", "0", "--out", str(out),
            *hooktrace_args, str(script), *args,
        ],
        cwd=traced_dir,
        **common,
    )  # fmt: skip
    return Runs(plain, traced, plain_dir, traced_dir, out)


def printed(stdout: str, key: str) -> list[float]:
    """The float after ``key`` on every line that has it (``step 3 loss 0.25 norm 1.5``, key ``norm``)."""
    values = []
    for line in stdout.splitlines():
        words = line.split()
        if key in words:
            values.append(float(words[words.index(key) + 1]))
    return values
