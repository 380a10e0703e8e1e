"""Activation memory on sampled steps: the bytes each module call saves for backward.

A module's forward pre-hook pushes a pair of ``saved_tensors_hooks`` (the context-manager's own
push/pop, without the context object) and its post-hook (``always_call=True``) pops it. Autograd
calls the innermost pair for every tensor an operation saves, so a save is seen by the innermost
module call that is running; the worker unions a call's storages with its subtree's for the
inclusive figure (``_aggregate/memory.py``). The pack hook only notes ``(storage address, storage
bytes)`` ints: it keeps no tensor alive and changes no value. It hands the tensor on:

- to the pair that was in force before ours (a user's ``save_on_cpu``, checkpoint's recomputation),
  whose unpack we push unchanged: the graph stores exactly what it stored without us;
- else as a detached alias with its version: returning the tensor itself would make a reference
  cycle through its ``grad_fn`` (the graph would never be freed); and since autograd skips its
  in-place check for hooked saves, unpack does that check itself, with PyTorch's message.

Inside a non-reentrant checkpoint's forward nothing is pushed: the checkpoint's own pack hook
drops what is saved there (it is recomputed in backward, where the recompute calls are counted).
Under ``torch.no_grad`` nothing is saved, so nothing is pushed either.

CUDA: the allocator's host-side counters (``memory_stats_as_nested_dict``, no device sync) give the
peak of each phase (reset after reading), and the allocated bytes around the sampled calls of roots
and of the modules that stand for a metric label (``reads_allocated``): each reading builds the
allocator's whole nested stats dict, so the readings per step are bounded by ``--max-modules``,
not by the model's module count.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from hooktrace._record.buffer import FWD_TRAIN, StepBuffer
from hooktrace._record.dispatch import saved_tensor_hook_ns
from hooktrace._record.module_table import ModuleTable

_autograd = torch._C._autograd
_top = _autograd._top_saved_tensors_default_hooks
_push = _autograd._push_saved_tensors_default_hooks
_pop = _autograd._pop_saved_tensors_default_hooks
_hooks_enabled = _autograd._saved_tensors_hooks_is_enabled  # type: ignore[attr-defined]

UNMEASURED = -1
"""``bytes`` of a save whose storage could not be read (a tensor subclass without storage)."""

MAX_ABOVE = 8
"""Pairs of others popped (and pushed back) to reach ours at a post-hook (see ``exit``)."""

_CHECKPOINT_PACK = "_checkpoint_hook."
"""``__qualname__`` prefix of torch.utils.checkpoint's forward pack hook (non-reentrant)."""


def _pack(saved: list[tuple[int, int]], outer: Callable[[torch.Tensor], Any] | None, tensor: torch.Tensor) -> Any:
    """The pack hook of one module call: note the storage, hand the tensor on (see the module doc)."""
    try:
        storage = tensor.untyped_storage()
        saved.append((storage.data_ptr(), storage.nbytes()))
    except Exception:  # a wrapper subclass (DTensor) has no storage of its own: counted, not measured
        saved.append((0, UNMEASURED))
    if outer is not None:
        return outer(tensor)
    return tensor.detach(), tensor._version


def _unpack(packed: tuple[torch.Tensor, int]) -> torch.Tensor:
    """The tensor back; raises like autograd when it was modified in place after it was saved."""
    tensor, version = packed
    if tensor._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{tensor.type()} {list(tensor.shape)}] is at version {tensor._version}; expected "
            f"version {version} instead. Hint: the backtrace further above shows the operation that "
            "failed to compute its gradient. (raised by autograd's check, run by hooktrace's saved-tensor hook)"
        )
    return tensor


def is_ours(pack: object) -> bool:
    return type(pack) is partial and pack.func is _pack


def _in_checkpoint(pack: object) -> bool:
    return getattr(pack, "__qualname__", "").startswith(_CHECKPOINT_PACK)


def _c_or(name: str, fallback: Any) -> Any:
    """PyTorch's C function ``name`` when this build has it, else the public wrapper."""
    return getattr(torch._C, name, fallback)


class CudaMemory:
    """The CUDA caching allocator's counters of one device, read on the host (never a sync).

    ``stats`` and ``reset`` default to the C functions behind ``torch.cuda.memory_stats_as_nested_dict``
    and ``torch.cuda.reset_peak_memory_stats`` (no wrapper; each reading still builds the whole
    nested dict, so ``SavedTensors`` reads it only around calls of roots and label modules); tests
    pass fakes to run this on a CPU machine.
    """

    def __init__(
        self,
        device: int,
        stats: Callable[[int], dict[str, Any]] | None = None,
        reset: Callable[[int], None] | None = None,
        total: int | None = None,
    ) -> None:
        self.device = device
        self.stats: Callable[[int], dict[str, Any]] = (
            stats if stats is not None else _c_or("_cuda_memoryStats", torch.cuda.memory_stats_as_nested_dict)
        )
        self.reset: Callable[[int], None] = (
            reset if reset is not None else _c_or("_cuda_resetPeakMemoryStats", torch.cuda.reset_peak_memory_stats)
        )
        self.total = total if total is not None else torch.cuda.get_device_properties(device).total_memory
        """Device memory in bytes (the alert's limit)."""

    def allocated(self) -> int:
        return int(self.stats(self.device)["allocated_bytes"]["all"]["current"])

    def phase_end(self, peaks: dict[str, tuple[int, int]], phase: str) -> None:
        """Fold the allocated and reserved peaks since the last reading into ``peaks[phase]``
        (the largest over the step's micro-batches), then restart the peaks from the current values."""
        stats = self.stats(self.device)
        peak = int(stats["allocated_bytes"]["all"]["peak"])
        reserved = int(stats["reserved_bytes"]["all"]["peak"])
        old = peaks.get(phase)
        peaks[phase] = (max(old[0], peak), max(old[1], reserved)) if old else (peak, reserved)
        self.reset(self.device)


class _Stack(threading.local):
    """The calling thread's pushed calls, innermost last (``__init__`` runs once per thread)."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []


class SavedTensors:
    """Pushes and pops the saved-tensor hooks of sampled module calls; one stack per thread
    (the autograd engine runs a CUDA backward, and so a checkpoint's recompute, on its own thread),
    the rest shared."""

    def __init__(self, table: ModuleTable | None = None) -> None:
        self._local = _Stack()
        self.table = table
        """Which modules stand for a metric label (``reads_allocated``); None: every module does."""
        self.skip_modules: set[int] = set()
        """Module indices never counted (none by default: a compiled module's hooks run outside its
        graph, so what the graph saves is counted as the module's, without a recompile)."""
        self.cuda: CudaMemory | None = None
        self._save_ns: int | None = None

    def save_ns(self) -> int:
        """What one saved tensor costs training with our hooks (pack, unpack, PyTorch calling
        them), measured once on first use (the worker's, not at attach): the reported overhead
        counts it per save, as no hook body times it."""
        if self._save_ns is None:
            self._save_ns = saved_tensor_hook_ns(partial(_pack, [], None), _unpack)
        return self._save_ns

    @property
    def depth(self) -> int:
        """Pushes this thread has not popped yet: the post-hook's cheap test. The length of this
        thread's stack, not a count kept beside it: a count shared by threads could lose an update
        (two ``+=`` at once), and a post-hook would then skip its pop. Enter and exit do no
        counting, so a sampled call costs what it did (the test itself costs ~70 ns more)."""
        return len(self._local.calls)

    def reads_allocated(self, index: int) -> bool:
        """Whether a sampled call of module ``index`` gets a CUDA allocated delta: a root, or a
        module whose metric label is its own display name (at most ``--depth`` deep, within
        ``--max-modules``). Each reading builds the allocator's whole stats dict: reading it around
        every call of a 1,000-module model would cost tens of ms per sampled step."""
        table = self.table
        if table is None:
            return True
        info = table.infos[index]
        return info.parent < 0 or info.label == info.display

    def enter(self, buf: StepBuffer, index: int, call: int, kind: int) -> None:
        """Forward pre-hook of a sampled call with grad enabled (training or recompute)."""
        if index in self.skip_modules or not _hooks_enabled():
            return
        top = _top(False)
        outer_pack: Any = None
        outer_unpack: Any = None
        if top is not None:
            pack, unpack = top
            if is_ours(pack):  # an enclosing call's: hand on to whatever it hands on to
                outer_pack = pack.args[1]  # type: ignore[attr-defined]
                outer_unpack = unpack if outer_pack is not None else None
            elif kind == FWD_TRAIN and _in_checkpoint(pack):
                return  # a checkpointed region keeps nothing: counted when recomputed
            else:
                outer_pack, outer_unpack = pack, unpack
        stack = self._local.calls
        calls = buf.saved_calls
        parent = stack[-1][3] if stack and stack[-1][4] is calls else -1
        saved: list[tuple[int, int]] = []
        cuda = self.cuda
        before = cuda.allocated() if cuda is not None and self.reads_allocated(index) else None
        record = [index, call, kind, parent, len(buf.marks), saved, before]
        packer = partial(_pack, saved, outer_pack)
        stack.append([index, packer, record, len(calls), calls, top[0] if top is not None else None])
        calls.append(record)
        try:
            _push(packer, outer_unpack or _unpack)
        except Exception:
            stack.pop()
            calls.pop()
            raise

    def exit(self, buf: StepBuffer, index: int) -> None:
        """Forward post-hook: pop this call's pair. Post-hooks run in registration order, not in
        reverse: another pusher's pre-hook registered after ours (a second agent) pushed above
        ours and pops after us. Then the pairs above ours are popped, ours too, and theirs pushed
        back in their order, so each pops its own (``MAX_ABOVE`` at most). When ours is gone, a
        pusher registered before ours popped it in its post-hook, which ran first: its own pair
        (the one under ours when we pushed, which our pack handed every save on to) is popped
        here in its place."""
        stack = self._local.calls
        if not stack or stack[-1][0] != index:
            return
        entry = stack[-1]
        above: list[tuple[Any, Any]] = []
        top = _top(False)
        while top is not None and top[0] is not entry[1] and len(above) < MAX_ABOVE:
            above.append(top)
            _pop()
            top = _top(False)
        found = top is not None and top[0] is entry[1]
        if found:
            _pop()
        for pack, unpack in reversed(above):
            _push(pack, unpack)
        stack.pop()
        if not found:
            top = _top(False)
            if top is not None and top[0] is entry[5] and not is_ours(top[0]):
                _pop()
            return
        cuda = self.cuda
        if cuda is not None:
            record = entry[2]
            if record[6] is not None:
                record[6] = cuda.allocated() - record[6]
            if not stack and record[2] == FWD_TRAIN:  # the outermost training call: forward ends
                cuda.phase_end(buf.cuda_memory, "forward")

    def unwind(self) -> int:
        """Pop this thread's pairs whose post-hook never ran (a KeyboardInterrupt inside a
        forward skips ``always_call`` hooks); called where no forward runs. Returns how many."""
        stack = self._local.calls
        popped = 0
        while stack:
            top = _top(False)
            if top is None or top[0] is not stack[-1][1]:
                break  # someone else's pair above ours: leave both
            _pop()
            stack.pop()
            popped += 1
        return popped


def storage_keys(tensors: list[torch.Tensor]) -> frozenset[int]:
    """Storage addresses of parameters and buffers: their saves are not activations."""
    keys: set[int] = set()
    for tensor in tensors:
        try:
            keys.add(tensor.untyped_storage().data_ptr())
        except Exception:
            continue
    return frozenset(keys)
