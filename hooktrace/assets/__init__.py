"""Files shipped with the package: the Prometheus rules and the Grafana dashboards.

In the source tree they are links to ``deploy/rules/`` and ``grafana/dashboards/`` (one source
of truth); a built wheel carries copies.
"""

from __future__ import annotations

import os
from importlib import resources


def read_asset(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


def copy_dashboards(out_dir: str) -> list[str]:
    """Copy every dashboard JSON into ``out_dir``; returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    folder = resources.files(__name__).joinpath("dashboards")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            path = os.path.join(out_dir, entry.name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(entry.read_text(encoding="utf-8"))
            written.append(path)
    return written


__all__ = ["copy_dashboards", "read_asset"]
