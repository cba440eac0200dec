"""Which slot indices are taken: the bookkeeping of :class:`~wrenbox.network.Network`'s slot pool. In
memory; rebuilt at start from the persisted sandboxes with ``adopt``."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from wrenbox.errors import AlreadyExists, InvalidArgument, Unavailable
from wrenbox.network.plan import check_index

__all__ = ["SlotAllocator"]


class SlotAllocator:
    """Hands out slot indices ``1 … capacity``, lowest free first. Thread-safe."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise InvalidArgument(f"slot capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self, *, highest: bool = False) -> int:
        """The lowest free index (the highest with ``highest``); Unavailable when every slot is taken."""
        order = range(self.capacity, 0, -1) if highest else range(1, self.capacity + 1)
        with self._lock:
            for index in order:
                if index not in self._used:
                    self._used.add(index)
                    return index
        raise Unavailable(f"no free network slots (all {self.capacity} in use)")

    def reserve(self, index: int) -> None:
        """Mark ``index`` taken (reconcile at start); AlreadyExists if it already is."""
        check_index(index, self.capacity)
        with self._lock:
            if index in self._used:
                raise AlreadyExists(f"network slot {index} is already in use")
            self._used.add(index)

    def adopt(self, indices: Iterable[int]) -> None:
        """Mark every index in ``indices`` taken, whether or not it already was (recovery at start)."""
        checked = [check_index(i, self.capacity) for i in indices]
        with self._lock:
            self._used.update(checked)

    def release(self, index: int) -> None:
        """Give ``index`` back. Releasing a free slot does nothing, so undo steps may run twice."""
        check_index(index, self.capacity)
        with self._lock:
            self._used.discard(index)

    def in_use(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._used)
