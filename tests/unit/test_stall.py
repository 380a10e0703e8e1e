"""The worker's CPU time counts as overhead while training stands still, not while it computes beside it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
import torch

from hooktrace._aggregate.stall import StallMeter

CHUNKS = 20
CHUNK_NS = 1_000_000


def _python_work(ns: int) -> None:
    """Hold the GIL for ``ns`` of this thread's CPU time (pure Python)."""
    until = time.thread_time_ns() + ns
    x = 0
    while time.thread_time_ns() < until:
        x += 1


def _charged_share(training: Callable[[threading.Event], None]) -> float:
    """Run ``training`` on this (the main) thread while a worker thread does ``CHUNKS`` stretches of
    Python work measured by a ``StallMeter`` watching this thread; the charged share of its CPU."""
    meter = StallMeter()
    meter.watch(threading.get_ident())
    done = threading.Event()
    totals = [0, 0]

    def worker() -> None:
        time.sleep(0.05)  # training is under way
        for _ in range(CHUNKS):
            start = time.thread_time_ns()
            meter.begin()
            _python_work(CHUNK_NS)
            totals[0] += meter.end()
            totals[1] += time.thread_time_ns() - start
            time.sleep(0.002)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    training(done)
    thread.join()
    return totals[0] / totals[1]


def _kernels(done: threading.Event) -> None:
    """Training in long kernels that release the GIL (one intra-op thread: one core), ~20x a
    worker stretch: the worker's stretches mostly end before training wants the GIL back."""
    a = torch.randn(1024, 1024)
    while not done.is_set():
        torch.mm(a, a)


def _python(done: threading.Event) -> None:
    """Training in Python that holds the GIL."""
    while not done.is_set():
        _python_work(100_000)


@pytest.fixture
def one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_worker_time_beside_kernels_costs_little_and_time_training_waits_for_costs_all() -> None:
    beside = _charged_share(_kernels)
    blocking = _charged_share(_python)
    assert blocking > 0.7, f"training waited for the GIL, yet only {blocking:.0%} of the worker's time was charged"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores >= 2:
        assert beside < 0.5, f"training ran its kernels meanwhile, yet {beside:.0%} of the worker's time was charged"
    else:  # one core: the worker's time is taken from training's kernels, and counts
        assert beside > 0.7, f"the worker took the only core, yet only {beside:.0%} of its time was charged"


def test_without_the_training_threads_clock_the_whole_cpu_time_counts() -> None:
    meter = StallMeter()  # never told which thread trains
    meter.begin()
    _python_work(CHUNK_NS)
    assert meter.end() >= CHUNK_NS


def test_a_training_thread_that_ended_makes_the_whole_cpu_time_count() -> None:
    meter = StallMeter()
    thread = threading.Thread(target=lambda: None)
    thread.start()
    ident = thread.ident
    assert ident is not None
    meter.watch(ident)
    thread.join()
    meter.begin()
    _python_work(CHUNK_NS)
    assert meter.end() >= CHUNK_NS
