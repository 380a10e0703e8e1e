"""Merge every <runs>/*/targets.json into one Prometheus file_sd file, every second, forever.

Each `hooktrace run` lists its ranks in <out>/targets.json, but Prometheus' file_sd only globs the
last path element: `/hooktrace-runs/*/targets.json` is refused. This sidecar of compose.yaml writes
the merged list into a volume Prometheus reads. Standard library only (runs in python:*-alpine).
`hooktrace stack` does the same with hooktrace.cli.stack.merge_targets; a test keeps them identical.

    python sync.py RUNS_DIR OUTPUT_FILE [INTERVAL_S]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def _is_group(group: Any) -> bool:
    """Whether ``group`` is a file_sd target group: non-empty string targets, string labels."""
    if not isinstance(group, dict):
        return False
    targets, labels = group.get("targets"), group.get("labels") or {}
    return (
        isinstance(targets, list)
        and bool(targets)
        and all(isinstance(t, str) for t in targets)
        and isinstance(labels, dict)
        and all(isinstance(v, str) for v in labels.values())
    )


def merge_targets(runs_dir: Path) -> list[dict[str, Any]]:
    """The file_sd groups of every ``runs_dir/*/targets.json``, in path order; bad files are skipped."""
    groups: list[dict[str, Any]] = []
    for path in sorted(runs_dir.glob("*/targets.json")):
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        groups += [
            {"targets": group["targets"], "labels": group.get("labels") or {}}
            for group in (loaded if isinstance(loaded, list) else [])
            if _is_group(group)
        ]
    return groups


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    runs_dir, output = Path(argv[0]), Path(argv[1])
    interval = float(argv[2]) if len(argv) == 3 else 1.0
    output.parent.mkdir(parents=True, exist_ok=True)
    last = None
    while True:
        text = json.dumps(merge_targets(runs_dir), indent=2) + "\n"
        if text != last:
            tmp = output.with_name(f".{output.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.chmod(tmp, 0o644)  # Prometheus runs as nobody
            tmp.replace(output)  # atomic: Prometheus never reads half a file
            last = text
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
