from __future__ import annotations

import pytest

from wrenbox.errors import Conflict, NotRunning
from wrenbox.records import TRANSITIONS, SandboxState, check_transition

S = SandboxState


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.CREATING, S.RUNNING),
        (S.RUNNING, S.PAUSING),
        (S.PAUSING, S.PAUSED),
        (S.PAUSING, S.RUNNING),  # failed pause: VM continued
        (S.PAUSED, S.RESUMING),
        (S.RESUMING, S.PAUSED),  # failed resume: snapshot untouched
        (S.PAUSED, S.SNAPSHOTTING),
        (S.SNAPSHOTTING, S.PAUSED),
        (S.ERROR, S.STOPPING),
        (S.STOPPING, S.DESTROYED),
    ],
)
def test_legal_moves(current: SandboxState, target: SandboxState) -> None:
    check_transition("abcd", current, target)


def test_pausing_a_paused_sandbox_is_not_running() -> None:
    with pytest.raises(NotRunning, match="paused, not running"):
        check_transition("abcd", S.PAUSED, S.PAUSING)


def test_busy_sandbox_says_try_again() -> None:
    with pytest.raises(Conflict, match="pausing; try again"):
        check_transition("abcd", S.PAUSING, S.STOPPING)


def test_destroyed_is_terminal() -> None:
    assert TRANSITIONS[S.DESTROYED] == frozenset()
    with pytest.raises(Conflict):
        check_transition("abcd", S.DESTROYED, S.RESUMING)


def test_every_state_can_reach_destroyed() -> None:
    for start in SandboxState:
        seen, todo = {start}, [start]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert S.DESTROYED in seen or start is S.DESTROYED, start
