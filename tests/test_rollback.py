from __future__ import annotations

import anyio
import pytest

from wrenbox.rollback import Rollback


def test_unwinds_newest_first_on_failure() -> None:
    order: list[str] = []
    with pytest.raises(RuntimeError) as info, Rollback("t") as rb:
        rb.push("a", order.append, "a")
        rb.push("b", order.append, "b")
        raise RuntimeError("step 3 failed")
    assert order == ["b", "a"]
    assert info.value.leftovers == []  # type: ignore[attr-defined]


def test_commit_keeps_everything() -> None:
    order: list[str] = []
    with Rollback() as rb:
        rb.push("a", order.append, "a")
        rb.commit()
    assert order == []
    assert len(rb) == 0


def test_failed_undo_is_reported_and_the_rest_still_run(caplog: pytest.LogCaptureFixture) -> None:
    order: list[str] = []

    def broken() -> None:
        raise OSError("device busy")

    with pytest.raises(ValueError, match="x") as info, Rollback("t") as rb:
        rb.push("first", order.append, "first")
        rb.push("loop device", broken)
        rb.push("last", order.append, "last")
        raise ValueError("x")
    assert order == ["last", "first"]
    assert info.value.leftovers == ["loop device"]  # type: ignore[attr-defined]
    assert "could not release loop device" in caplog.text


@pytest.mark.anyio
async def test_async_rollback_awaits_async_undos() -> None:
    order: list[str] = []

    async def release(x: str) -> None:
        order.append(x)

    with pytest.raises(KeyError):
        async with Rollback() as rb:
            rb.push("sync", order.append, "sync")
            rb.push("async", release, "async")
            raise KeyError("k")
    assert order == ["async", "sync"]


def test_async_undo_in_sync_rollback_is_a_leftover() -> None:
    async def release() -> None:
        pass

    rb = Rollback()
    rb.push("async thing", release)
    assert rb.unwind() == ["async thing"]


@pytest.mark.anyio
async def test_a_cancelled_operation_still_unwinds_completely() -> None:
    released: list[str] = []

    async def release(x: str) -> None:
        await anyio.sleep(0.01)  # would raise at once in the cancelled scope without the shield
        released.append(x)

    with anyio.move_on_after(0.05):
        async with Rollback() as rb:
            rb.push("a", release, "a")
            rb.push("b", release, "b")
            await anyio.sleep(10)
    assert released == ["b", "a"]
