"""Ranks learn the job's slowest rank through the process group's store, without a shared directory."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from hooktrace.slowest_rank import SlowestRank


def _row(rank: int, busy: float) -> dict[str, Any]:
    return {"rank": rank, "busy_time_s": busy, "step_time_s": 0.5}


def test_ranks_on_separate_directories_learn_the_slowest_rank_through_a_real_tcp_store(tmp_path: Path) -> None:
    timeout = datetime.timedelta(seconds=5)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timeout)
    clients = [dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timeout) for _ in range(3)]
    ranks = [SlowestRank("job", 0, rank, 3, store=clients[rank]) for rank in range(3)]
    dirs = [tmp_path / f"node{rank}" for rank in range(3)]  # no shared filesystem
    for path in dirs:
        path.mkdir()
    # nothing is known until every rank has reported once (rank 1 has not yet)
    assert ranks[2].learn(_row(2, 0.30), str(dirs[2])) is None
    assert ranks[0].learn(_row(0, 0.10), str(dirs[0])) is None
    assert ranks[1].learn(_row(1, 0.12), str(dirs[1])) is None
    assert ranks[0].learn(_row(0, 0.10), str(dirs[0])) == 2
    assert ranks[1].learn(_row(1, 0.12), str(dirs[1])) == 2
    # busy times move: rank 1 becomes the slowest, and every rank hears of it
    assert ranks[1].learn(_row(1, 0.50), str(dirs[1])) == 2
    assert ranks[2].learn(_row(2, 0.20), str(dirs[2])) == 2
    assert ranks[0].learn(_row(0, 0.10), str(dirs[0])) == 1
    assert [r.learn(None, str(d)) for r, d in zip(ranks, dirs, strict=True)] == [1, 1, 1]


def test_a_run_id_and_restart_keep_their_own_keys() -> None:
    store = dist.HashStore()
    first = SlowestRank("job", 0, 0, 1, store=store)
    restarted = SlowestRank("job", 1, 0, 1, store=store)
    assert first.learn(_row(0, 0.2), "/nonexistent") == 0
    assert restarted.learn(None, "/nonexistent") is None


class _GoneStore:
    def add(self, key: str, value: int) -> int:
        raise RuntimeError("Connection reset by peer")


def test_without_a_working_store_the_ranks_sharing_the_directory_learn_it_from_their_summaries(tmp_path: Path) -> None:
    for rank, busy in [(0, 0.10), (5, 0.31)]:
        (tmp_path / f"rank{rank}.summary.json").write_text(json.dumps({"ranks": [_row(rank, busy)]}))
    broken = SlowestRank("job", 0, 0, 16, store=_GoneStore())
    assert broken.learn(_row(0, 0.1), str(tmp_path)) == 5
    assert broken.learn(_row(0, 0.1), str(tmp_path)) == 5  # and it stops asking the store
    no_group = SlowestRank("job", 0, 0, 16)  # no process group initialised in this test process
    assert no_group.learn(_row(0, 0.1), str(tmp_path)) == 5
