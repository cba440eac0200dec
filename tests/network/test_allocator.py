from __future__ import annotations

import threading

import pytest

from wrenbox.errors import AlreadyExists, InvalidArgument, Unavailable
from wrenbox.network import SlotAllocator


def test_allocates_lowest_free_index() -> None:
    slots = SlotAllocator(4)
    assert [slots.allocate() for _ in range(3)] == [1, 2, 3]
    slots.release(2)
    assert slots.allocate() == 2
    assert slots.allocate() == 4
    with pytest.raises(Unavailable):
        slots.allocate()


def test_reserve_for_reconcile() -> None:
    slots = SlotAllocator(8)
    slots.reserve(1)
    slots.reserve(3)
    assert slots.allocate() == 2
    assert slots.allocate() == 4
    with pytest.raises(AlreadyExists):
        slots.reserve(3)
    assert slots.in_use() == {1, 2, 3, 4}


def test_release_is_idempotent() -> None:
    slots = SlotAllocator(2)
    index = slots.allocate()
    slots.release(index)
    slots.release(index)
    assert slots.in_use() == frozenset()


@pytest.mark.parametrize("index", [0, 3, -1, True, "1"])
def test_indices_outside_capacity_are_refused(index: object) -> None:
    slots = SlotAllocator(2)
    with pytest.raises(InvalidArgument):
        slots.reserve(index)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        slots.release(index)  # type: ignore[arg-type]


def test_concurrent_allocations_never_share_an_index() -> None:
    slots = SlotAllocator(400)
    got: list[int] = []
    lock = threading.Lock()

    def grab() -> None:
        for _ in range(50):
            index = slots.allocate()
            with lock:
                got.append(index)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 401))


def test_highest_free_index_for_builds() -> None:
    slots = SlotAllocator(4)
    assert slots.allocate(highest=True) == 4
    assert slots.allocate() == 1
    assert slots.allocate(highest=True) == 3


def test_adopt_takes_indices_whether_or_not_taken() -> None:
    slots = SlotAllocator(4)
    first = slots.allocate()
    slots.adopt([first, 3])
    assert slots.in_use() == {1, 3}
    with pytest.raises(InvalidArgument):
        slots.adopt([5])
