"""The saved-tensor hooks' bookkeeping is per thread: the autograd engine runs a CUDA backward, and
so a checkpoint's recompute, on its own thread while the training thread has pairs pushed."""

from __future__ import annotations

import threading

import torch

from hooktrace._record.buffer import FWD_RECOMPUTE, FWD_TRAIN, StepBuffer
from hooktrace._record.memory import SavedTensors

_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def test_each_thread_counts_only_the_pairs_it_pushed_and_pops_its_own() -> None:
    """A count shared by threads (``+=`` from two threads) could lose an update, and a post-hook
    would then skip its pop: each thread's ``depth`` is its own."""
    saved = SavedTensors()
    saved.skip_modules.add(7)
    buf = StepBuffer(number=1, sampled=True, start_ns=1)
    saved.enter(buf, 0, 0, FWD_TRAIN)
    seen: list[object] = []

    def engine_thread() -> None:
        seen.append((saved.depth, saved.skip_modules, saved.cuda))  # shared settings, own count
        saved.enter(buf, 1, 0, FWD_RECOMPUTE)
        seen.append(saved.depth)
        saved.exit(buf, 1)
        seen.append((saved.depth, _top_hooks(False)))

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    try:
        assert seen == [(0, {7}, None), 1, (0, None)]
        assert saved.depth == 1  # the training thread's pair, untouched
    finally:
        saved.exit(buf, 0)
    assert saved.depth == 0 and _top_hooks(False) is None
    assert [record[0] for record in buf.saved_calls] == [0, 1]


def test_a_thread_that_unwinds_pops_only_its_own_pairs() -> None:
    saved = SavedTensors()
    buf = StepBuffer(number=1, sampled=True, start_ns=1)
    saved.enter(buf, 0, 0, FWD_TRAIN)
    unwound: list[int] = []
    thread = threading.Thread(target=lambda: unwound.append(saved.unwind()))
    thread.start()
    thread.join()
    assert unwound == [0] and saved.depth == 1
    assert saved.unwind() == 1 and saved.depth == 0 and _top_hooks(False) is None
