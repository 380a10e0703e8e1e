"""Instrumented modules pickle, save and deep-copy as if hooktrace were not attached.

The agent's hooks live in the modules' own hook dicts, so ``pickle.dumps(model)``,
``torch.save(model)`` and ``copy.deepcopy(model)`` would carry them along: pickling fails on a
local function, and a deep copy (an EMA model) would report into the agent. Both pickle (the C
``Pickler`` and its subclasses, ``torch.save``'s included) and ``copy.deepcopy`` look up
``copyreg.dispatch_table`` by exact type before calling ``__reduce_ex__``; for every class the
agent instruments, a reducer there returns the object's normal reduction with a state whose hook
dicts lack hooktrace's entries. The live module is never changed; an object without our hooks
is reduced exactly as without the reducer, and a module that cannot be pickled fails as before.

Limits: a class with its own ``__deepcopy__`` is deep-copied by that method, hooks included;
``copy.copy`` keeps sharing the hook dicts with the original, as it does without hooktrace. The
reducer cannot see the pickle protocol; it asks for the protocol-4 reduction, which every
protocol accepts (and which is the same as protocol 2's for a module).
"""

from __future__ import annotations

import copy
import copyreg
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

_HOOK_DICTS: dict[str, tuple[str, ...]] = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
}
"""Module hook dicts, each with the dicts that hold flags under the same hook ids."""

_PROTOCOL = 4
"""``copy.deepcopy`` asks for this one; ``__reduce_ex__`` gives the same for 2 and up, except for
``__getnewargs_ex__`` keywords, which picklers below 4 rewrite themselves."""

_COPY_CODE = copy.copy.__code__


def exclude_from_pickles(cls: type) -> None:
    """Make instances of ``cls`` pickle and deep-copy without hooktrace's hooks. Once per class;
    a reducer registered for ``cls`` before is called in turn."""
    previous = copyreg.dispatch_table.get(cls)
    if isinstance(previous, HookFreeReducer):
        return
    copyreg.dispatch_table[cls] = HookFreeReducer(previous)


class HookFreeReducer:
    """``copyreg.dispatch_table`` entry: the normal reduction, hooktrace's hooks left out.

    Called by picklers and ``copy`` from any thread, also from inside a forward hook mid-step:
    reads the hook dicts, writes nothing but new dicts."""

    __slots__ = ("previous",)

    def __init__(self, previous: Callable[[Any], Any] | None) -> None:
        self.previous = previous

    def __call__(self, obj: Any) -> Any:
        reduced = self.previous(obj) if self.previous is not None else obj.__reduce_ex__(_PROTOCOL)
        if not isinstance(reduced, tuple) or len(reduced) < 3:
            return reduced  # a global's name, or no state
        if sys._getframe(1).f_code is _COPY_CODE:
            return reduced  # a shallow copy shares the hook dicts, ours included, as without us
        state = reduced[2]
        if isinstance(state, dict):
            stripped = without_our_hooks(state)
            if stripped is not None:
                return (*reduced[:2], stripped, *reduced[3:])
        elif isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            stripped = without_our_hooks(state[0])  # (__dict__, __slots__ values)
            if stripped is not None:
                return (*reduced[:2], (stripped, state[1]), *reduced[3:])
        return reduced


def without_our_hooks(state: dict[str, Any]) -> dict[str, Any] | None:
    """A shallow copy of a module's state whose hook dicts lack hooktrace's entries (and their
    flags); ``None`` when it holds none of ours."""
    stripped: dict[str, Any] | None = None
    for name, flag_dicts in _HOOK_DICTS.items():
        hooks = state.get(name)
        if not isinstance(hooks, dict) or not hooks:
            continue
        ours = [key for key, hook in list(hooks.items()) if is_ours(hook)]
        if not ours:
            continue
        if stripped is None:
            stripped = state.copy()
        stripped[name] = _without(hooks, ours)
        for flag_name in flag_dicts:
            flags = state.get(flag_name)
            if isinstance(flags, dict) and any(key in flags for key in ours):
                stripped[flag_name] = _without(flags, ours)
    if (
        stripped is not None
        and stripped.get("_is_full_backward_hook") is True
        and not stripped.get("_backward_hooks")
        and state.get("_backward_hooks")
    ):
        stripped["_is_full_backward_hook"] = None  # set by our full backward hooks, as before them
    return stripped


def _without(hooks: dict[Any, Any], keys: list[Any]) -> dict[Any, Any]:
    kept = hooks.copy()  # an OrderedDict stays one, in the same order
    for key in keys:
        kept.pop(key, None)
    return kept


def is_ours(hook: Any) -> bool:
    """Whether a hook is hooktrace's: a function, bound method or partial from this package."""
    while isinstance(hook, partial):
        hook = hook.func
    module = getattr(hook, "__module__", None)
    return isinstance(module, str) and (module == "hooktrace" or module.startswith("hooktrace."))
