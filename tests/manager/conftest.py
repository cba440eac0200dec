"""Fixtures of the manager's unit tests: a real SQLite store (holding the ``minimal`` template's row) and
a fake runtime (``fakes.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenbox.manager import ManagerConfig, SandboxManager
from wrenbox.manager.store import Store
from wrenbox.records import TemplateRecord, TemplateState

from .fakes import FakeRuntime


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.db") as s:
        minimal = TemplateRecord(
            name="minimal", kind="base", path="/t/minimal", vcpus=1, memory_mb=256, state=TemplateState.READY
        )
        s.insert_template(minimal)
        yield s


def make_manager(store: Store, runtime: FakeRuntime, **config: object) -> SandboxManager:
    return SandboxManager(ManagerConfig(**config), store, runtime)  # type: ignore[arg-type]


@pytest.fixture
def mgr(store: Store, runtime: FakeRuntime) -> SandboxManager:
    return make_manager(store, runtime)
