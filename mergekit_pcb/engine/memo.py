"""Prepared tensors kept from one in-memory merge to the next.

An evolution merges its population once per candidate, and a candidate replaces one
member: the other members' trimmed (or randomly dropped) task vectors are the same as for
the previous candidate. For a separable method (`MergeMethod.separable`) the engine keeps
each model's prepared tensor here, keyed by what identifies it: the checkpoint's identity
(file, inode, mtime, size), its position (seeded masks are keyed by position), the tensor
and the slice. Only checkpoints with an identity are kept: an evolution names its trial, so
that an accepted trial's entries move to its member file (`rename`).
Whole-model statistics a model alone determines (a global PCB's clip bounds) are kept the
same way, so a member's statistics passes are skipped too, and so are the per-part tensors
such statistics derive from one model alone (a global PCB's task vectors and intra-balancing
terms, `ModelParts`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable

import torch

PreparedKey = tuple[Hashable, int, str, int | None]  # identity, position, tensor, slice start


class PreparedMemo:
    """Least recently used prepared tensors, up to `budget_bytes` in all."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[PreparedKey, torch.Tensor] = OrderedDict()
        self._results: dict[PreparedKey, object] = {}
        self.nbytes = 0
        self.hits = 0

    def result(self, key: PreparedKey) -> object | None:
        """A model's own statistics from an earlier merge (`GlobalStats.model_results`)."""
        found = self._results.get(key)
        if found is not None:
            self.hits += 1
        return found

    def keep_result(self, key: PreparedKey, value: object) -> None:
        self._results[key] = value  # a few numbers per model: outside the byte budget

    def get(self, key: PreparedKey) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is None:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: PreparedKey, tensor: torch.Tensor) -> None:
        size = _nbytes(tensor)
        if size > self.budget_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= _nbytes(old)
        while self._entries and self.nbytes + size > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= _nbytes(dropped)
        self._entries[key] = tensor
        self.nbytes += size

    def keep_only(self, identities: Iterable[Hashable]) -> None:
        """Forget the tensors of checkpoints no longer merged (replaced members)."""
        keep = set(identities)
        for key in [k for k in self._entries if k[0] not in keep]:
            self.nbytes -= _nbytes(self._entries.pop(key))
        for key in [k for k in self._results if k[0] not in keep]:
            del self._results[key]

    def rename(self, old: Hashable, new: Hashable) -> None:
        """What was kept for checkpoint `old` now belongs to `new` (an accepted trial,
        written to a member file with the same tensors)."""
        for store in (self._entries, self._results):
            for key in [k for k in store if k[0] == old]:
                store[(new, *key[1:])] = store.pop(key)  # type: ignore[index]

    def clear(self) -> None:
        self._entries.clear()
        self._results.clear()
        self.nbytes = 0


class ModelParts:
    """One model's per-part tensors in a memo, for its statistics (`GlobalStats.reuse_parts`),
    under the model's identity and position and the statistics' `scope`."""

    def __init__(self, memo: PreparedMemo, identity: Hashable, position: int,
                 scope: str) -> None:
        self._memo = memo
        self._identity = identity
        self._position = position
        self._scope = scope

    def _key(self, kind: str, name: str, start: int | None) -> PreparedKey:
        return (self._identity, self._position, f"{self._scope}/{kind}/{name}", start)

    def get(self, kind: str, name: str, start: int | None) -> torch.Tensor | None:
        return self._memo.get(self._key(kind, name, start))

    def put(self, kind: str, name: str, start: int | None, tensor: torch.Tensor) -> None:
        self._memo.put(self._key(kind, name, start), tensor)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


__all__ = ["ModelParts", "PreparedKey", "PreparedMemo"]
