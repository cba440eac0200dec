"""The shortest path through a real sandbox: create, exec, destroy, nothing left."""

from __future__ import annotations

import pytest

from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.records import SandboxState

from .conftest import leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]


async def test_create_exec_destroy(manager: SandboxManager, settings: Settings) -> None:
    sb = await manager.create(CreateRequest(env={"GREETING": "hi"}))
    assert sb.state is SandboxState.RUNNING
    result = await manager.exec(sb.id, "echo $GREETING; id -un")
    assert result.exit_code == 0
    assert result.stdout.split() == [b"hi", b"user"]
    await manager.destroy(sb.id)
    assert manager.get(sb.id).state is SandboxState.DESTROYED
    assert leftovers(settings) == {}
