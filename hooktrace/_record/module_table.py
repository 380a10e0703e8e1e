"""Who is who: a stable index, name, type, parent and metric label for every instrumented module.

Built on the training thread when modules are instrumented (not in hooks). Names come from
``named_modules()`` of each root with wrapper prefixes removed, so DDP's ``module.`` or
``torch.compile``'s ``_orig_mod.`` never leak into span names or labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hooktrace._aggregate.snapshot import OTHER

WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
"""Name parts added by torch.compile, FSDP and checkpoint wrappers (anywhere in a name)."""

DDP_PREFIX = "module"
"""DDP's wrapped model: removed only as the first part, so a user's ``encoder.module`` stays."""


def clean_name(name: str) -> str:
    """``module._orig_mod.blocks.0`` -> ``blocks.0``; the root itself is ``""``."""
    parts = [part for part in name.split(".") if part and part not in WRAPPER_PARTS]
    if parts and parts[0] == DDP_PREFIX:
        parts = parts[1:]
    return ".".join(parts)


def cut_name(name: str, depth: int) -> str:
    """The metric label of a module: its name cut to ``depth`` dotted parts."""
    return ".".join(name.split(".")[:depth])


@dataclass(slots=True)
class ModuleInfo:
    """One instrumented module."""

    index: int
    name: str
    """Cleaned ``named_modules`` name; ``""`` for a root, shown as its root label."""
    display: str
    """Name in spans and summaries: the root's label for roots, else ``<root label>.<name>``
    only when there are several roots, else ``name``."""
    type_name: str
    parent: int
    """Index of the parent module, -1 for a root."""
    root: int
    label: str = ""
    """``module`` label value: the display name cut to --depth, or ``__other__`` past --max-modules."""
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)
    """This module's own (not recursive) parameters, with cleaned full names (tied ones once)."""
    buffers: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    """This module's own floating-point buffers (e.g. BatchNorm running statistics)."""


class ModuleTable:
    """Indexes modules in the order they are found; indices never change while attached."""

    def __init__(self, depth: int, max_modules: int) -> None:
        self.depth = depth
        self.max_modules = max_modules
        self.infos: list[ModuleInfo] = []
        self.by_id: dict[int, int] = {}
        self.roots: list[int] = []
        self.labels: set[str] = set()
        self.truncated = 0
        self.param_ids: set[int] = set()
        """ids of the instrumented parameters (tied ones once)."""

    def __len__(self) -> int:
        return len(self.infos)

    def index_of(self, module: nn.Module) -> int | None:
        return self.by_id.get(id(module))

    def add_root(self, root: nn.Module, root_label: str, descend: bool = True) -> list[tuple[int, nn.Module]]:
        """Index ``root`` and every submodule not indexed yet; returns the new (index, module) pairs.

        ``descend=False`` indexes the root alone (a compiled module: its inside is Dynamo's).
        """
        added: list[tuple[int, nn.Module]] = []
        root_index = self.by_id.get(id(root))
        parents: dict[int, int] = {}
        walk = root.named_modules() if descend else iter([("", root)])
        for raw_name, module in walk:
            for child in module.children():
                parents.setdefault(id(child), id(module))
            if id(module) in self.by_id:
                continue
            name = clean_name(raw_name)
            display = root_label if not raw_name else f"{root_label}.{name}" if root_label else name
            parent_id = parents.get(id(module))
            parent = self.by_id[parent_id] if parent_id is not None and parent_id in self.by_id else -1
            index = len(self.infos)
            info = ModuleInfo(
                index=index,
                name=name,
                display=display or type(module).__name__,
                type_name=type(module).__name__,
                parent=parent,
                root=root_index if root_index is not None else index,
            )
            if not raw_name:
                root_index = index
                info.root = index
                self.roots.append(index)
            info.label = self._label_for(info.display)
            own = module.named_parameters(recurse=not descend)
            for pname, param in own:
                if id(param) in self.param_ids:
                    continue  # tied weights count once, at their first owner
                self.param_ids.add(id(param))
                full = clean_name(".".join(part for part in (root_label, name, pname) if part))
                info.params.append((full, param))
            for bname, buffer in module.named_buffers(recurse=not descend):
                if buffer is not None and buffer.is_floating_point():
                    info.buffers.append((clean_name(".".join(p for p in (root_label, name, bname) if p)), buffer))
            self.infos.append(info)
            self.by_id[id(module)] = index
            added.append((index, module))
        return added

    def relabel_root(self, root: int, root_label: str) -> None:
        """Prefix every module of ``root`` with ``root_label`` (a second root model was found
        during the first step: from then on every name says which model it belongs to)."""
        renamed = [info for info in self.infos if info.root == root]
        old_labels = {info.label for info in renamed}
        for info in renamed:
            info.display = f"{root_label}.{info.name}" if info.name else root_label
            info.params = [(clean_name(f"{root_label}.{name}"), param) for name, param in info.params]
            info.buffers = [(clean_name(f"{root_label}.{name}"), buffer) for name, buffer in info.buffers]
        still_used = {info.label for info in self.infos if info.root != root}
        self.labels -= old_labels - still_used
        for info in renamed:
            if info.label != OTHER:
                info.label = self._label_for(info.display)

    def _label_for(self, display: str) -> str:
        label = cut_name(display, self.depth)
        if label in self.labels:
            return label
        if len(self.labels) >= self.max_modules:
            self.truncated += 1
            return OTHER
        self.labels.add(label)
        return label
