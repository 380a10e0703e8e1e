"""Ranks learn the job's slowest rank through the process group's store, without a shared directory."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hooktrace
from hooktrace.slowest_rank import SWITCH_MARGIN, SlowestRank, choose_slowest
from hooktrace.summary import STRAGGLER_RATIO


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
    first = [SlowestRank("job", 0, rank, 2, store=store) for rank in range(2)]
    restarted = SlowestRank("job", 1, 0, 2, store=store)
    assert first[1].learn(_row(1, 0.4), "/nonexistent") is None
    assert first[0].learn(_row(0, 0.2), "/nonexistent") == 1
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


def _job(world: int) -> list[SlowestRank]:
    store = dist.HashStore()
    return [SlowestRank("job", 0, rank, world, store=store) for rank in range(world)]


def _exchange(ranks: list[SlowestRank], busy: dict[int, float]) -> list[int | None]:
    """One round of the 10 s exchange: every rank publishes, rank 0 (last) chooses, every rank reads."""
    for rank in reversed(ranks):
        rank.learn(_row(rank.rank, busy[rank.rank]), None)
    return [rank.learn(None, None) for rank in ranks]


def test_near_equal_ranks_name_no_slowest_rank_however_their_order_changes() -> None:
    ranks = _job(16)
    for shift in range(5):  # the busiest rank is another one every round, by at most 3 %
        busy = {rank: 0.200 * (1 + 0.002 * ((rank + shift) % 16)) for rank in range(16)}
        assert _exchange(ranks, busy) == [None] * 16
    assert choose_slowest({rank: 0.2 + 1e-5 * rank for rank in range(1000)}, None) is None  # 5 % apart at most


def test_a_real_straggler_is_named_and_unnamed_once_it_recovers() -> None:
    ranks = _job(16)
    busy = dict.fromkeys(range(16), 0.200)
    busy[7] = 0.300  # 1.5x the median rank
    assert _exchange(ranks, busy) == [7] * 16
    busy[7] = 0.205  # no longer 1.1x the median: its per-module series may stop
    assert _exchange(ranks, busy) == [None] * 16


def test_two_ranks_alternating_within_the_margin_do_not_flip_the_choice() -> None:
    ranks = _job(16)
    busy = dict.fromkeys(range(16), 0.200)
    for step in range(6):  # ranks 3 and 11 both straggle and take turns being the busier, by 3 %
        busy[3], busy[11] = (0.309, 0.300) if step % 2 else (0.300, 0.309)
        assert _exchange(ranks, busy) == [11] * 16
    busy[3] = 0.300 * SWITCH_MARGIN * 1.01  # a clear margin above the named rank: the choice moves
    assert _exchange(ranks, busy) == [3] * 16


def test_the_named_rank_gives_way_when_it_falls_below_the_straggler_ratio() -> None:
    median = 0.2
    named = {0: median, 1: median, 2: median, 3: STRAGGLER_RATIO * median * 1.01, 4: STRAGGLER_RATIO * median * 1.03}
    assert choose_slowest(named, 3) == 3  # rank 4 is busier, but within the margin
    assert choose_slowest({**named, 3: median * 1.05}, 3) == 4  # rank 3 no longer stands out
    assert choose_slowest({0: 0.2}, 0) is None  # one rank is nobody's straggler


def test_the_ranks_sharing_a_directory_keep_the_named_rank_the_same_way(tmp_path: Path) -> None:
    def write(busy: dict[int, float]) -> None:
        for rank, value in busy.items():
            (tmp_path / f"rank{rank}.summary.json").write_text(json.dumps({"ranks": [_row(rank, value)]}))

    learner = SlowestRank("job", 0, 0, 8, store=_GoneStore())
    write({0: 0.2, 1: 0.2, 2: 0.2, 3: 0.2, 4: 0.300, 5: 0.309})
    assert learner.learn(_row(0, 0.2), str(tmp_path)) == 5
    write({4: 0.309, 5: 0.300})
    assert learner.learn(_row(0, 0.2), str(tmp_path)) == 5
    write(dict.fromkeys(range(6), 0.2))
    assert learner.learn(_row(0, 0.2), str(tmp_path)) is None


class _Probe:
    """An exporter that only remembers the slowest rank the agent gave it."""

    name = "probe"
    slowest_rank: int | None = None

    def start(self) -> None: ...
    def export_step(self, step: Any) -> None: ...
    def refresh(self, snapshot: Any) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def test_a_rank_that_writes_no_files_still_learns_the_slowest_rank_at_its_checkpoints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may be written: the test checks the directory stays empty
    for name, value in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}.items():
        monkeypatch.setenv(name, value)
    agent = hooktrace.Agent(write_files=False, metrics_port=0)
    store = dist.HashStore()
    agent._slowest = SlowestRank("job", 0, 3, 16, store=store)
    store.set("hooktrace/job/0/slowest", "11")  # what rank 0 chose
    probe = _Probe()
    agent.exporters.append(probe)
    model = nn.Linear(4, 1)
    agent.attach(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(10):
        model(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert agent.flush_now(timeout=10)  # the checkpoint the worker runs every 10 s, now
    agent.close()
    assert probe.slowest_rank == 11
    busy_key = "hooktrace/job/0/busy_us/3"  # and it published its own busy time
    assert store.check([busy_key]) and int(store.get(busy_key)) > 0
    assert list(tmp_path.iterdir()) == []
