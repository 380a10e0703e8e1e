"""Real multi-process DDP (gloo, 2 ranks on CPU) under `hooktrace run --nproc-per-node 2`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import read_steps, read_trace, retry_gloo_abort
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
DDP = REPO / "examples" / "train_ddp.py"


def _losses(stdout: str) -> list[str]:
    # two ranks share one stdout: lines may interleave, the fixed 6 decimals keep entries apart
    return sorted(re.findall(r"rank \d step \d+ loss -?\d+\.\d{6}", stdout))


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return retry_gloo_abort(
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(free_port()),
                str(DDP),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )
    )


def _hooktrace(out: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return retry_gloo_abort(
        lambda: subprocess.run(
            [
                sys.executable,
                "-m",
                "hooktrace.cli.main",
                "run",
                "--metrics-port",
                "0",
                "--out",
                str(out),
                "--sample-every",
                "2",
                "--nproc-per-node",
                "2",
                "--master-port",
                str(free_port()),  # not torchrun's fixed 29500: a previous run may still hold it
                str(DDP),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=cwd,
        )
    )


def test_two_ranks_give_identical_losses_per_rank_files_and_a_merged_summary(tmp_path: Path) -> None:
    bare = _torchrun("--steps", "12", cwd=tmp_path)
    traced = _hooktrace(tmp_path / "run", "--steps", "12", cwd=tmp_path)
    assert bare.returncode == 0, bare.stderr
    assert traced.returncode == 0, traced.stderr
    assert _losses(traced.stdout) == _losses(bare.stdout) and len(_losses(bare.stdout)) == 24
    out = tmp_path / "run"
    for rank in (0, 1):
        steps = read_steps(out, rank)
        assert [s["step"] for s in steps] == list(range(1, 13)) and {s["rank"] for s in steps} == {rank}
        assert any(e.get("ph") == "X" and e["name"] == "forward encoder.0" for e in read_trace(out, rank))
    # all-reduce is timed: whichever rank finishes its backward first waits for the other
    waits = [s["phases"].get("allreduce", 0.0) for rank in (0, 1) for s in read_steps(out, rank)]
    assert sum(waits) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["ranks"]] == [0, 1]
    assert summary["grad_consistency"]["checked_steps"] == 12
    assert summary["grad_consistency"]["mismatched_steps"] == 0
    assert "Step breakdown" in traced.stderr and "rank 1: step" in traced.stderr


def test_a_rank_slowed_in_one_module_is_named_with_that_module(tmp_path: Path) -> None:
    result = _hooktrace(tmp_path / "run", "--steps", "12", "--slow-rank", "1", "--slow-s", "0.03", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    straggler = summary["straggler"]
    assert straggler["rank"] == 1 and straggler["ratio"] > 1.3
    assert straggler["modules"][0]["module"] == "bottleneck" and straggler["modules"][0]["phase"] == "forward"
    per_rank = {
        m["rank"]: m["per_step_s"]
        for m in summary["modules"]
        if m["module"] == "bottleneck" and m["phase"] == "forward"
    }
    assert per_rank[1] > 0.03 > per_rank[0]
    # the fast rank waits for the slow one in all-reduce
    fast = next(r for r in summary["ranks"] if r["rank"] == 0)
    assert fast["phases"]["allreduce"] > 0.02
    assert "Straggler: rank 1" in result.stderr


def test_a_users_own_comm_hook_stays_in_place_and_still_works(tmp_path: Path) -> None:
    bare = _torchrun("--steps", "6", "--comm-hook", cwd=tmp_path)
    traced = _hooktrace(tmp_path / "run", "--steps", "6", "--comm-hook", cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    assert _losses(traced.stdout) == _losses(bare.stdout)
    calls = re.findall(r"rank \d comm hook calls (\d+)", traced.stdout)
    assert len(calls) == 2 and all(int(c) >= 6 for c in calls)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert any("own DDP comm hook" in note for note in summary["notes"])


def test_a_crashing_rank_passes_the_failure_through_and_the_survivor_keeps_readable_files(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _hooktrace(out, "--steps", "50", "--crash-rank", "1", "--crash-at", "6", cwd=tmp_path)
    assert result.returncode != 0
    assert "rank 1 crashing at step 6" in result.stdout
    steps = read_steps(out, 0)
    assert steps and [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert json.loads((out / "rank0.summary.json").read_text())["steps"] >= len(steps) - 1
