"""The two seams of the control plane hold, member by member: ``SandboxManager`` implements every part of
the ``Sandboxes`` face with the same signature, and both runtimes (the host's and the unit tests' fake)
implement the ``Runtime`` protocol the same way. A fake that drifts from the real thing would let the
manager's tests pass against a seam that does not exist."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from wrenbox.manager import Sandboxes, SandboxManager
from wrenbox.runtime.base import Runtime
from wrenbox.runtime.host import HostRuntime

from .fakes import FakeRuntime


def members(protocol: type) -> dict[str, Any]:
    own = {k: v for k, v in vars(protocol).items() if not k.startswith("_")}
    return {k: v for k, v in own.items() if callable(v)}


def shape(fn: Any) -> list[tuple[str, Any, bool]]:
    """Parameter names, kinds and whether they have defaults (annotations are strings; not compared)."""
    params = inspect.signature(fn).parameters.values()
    return [(p.name, p.kind, p.default is not inspect.Parameter.empty) for p in params]


@pytest.mark.parametrize("name", sorted(members(Sandboxes)))
def test_the_manager_implements_the_face(name: str) -> None:
    face = members(Sandboxes)[name]
    impl = getattr(SandboxManager, name)
    assert shape(impl) == shape(face), name
    if inspect.iscoroutinefunction(face):
        assert inspect.iscoroutinefunction(impl), f"{name} must be async"


@pytest.mark.parametrize("implementation", [HostRuntime, FakeRuntime])
@pytest.mark.parametrize("name", sorted(members(Runtime)))
def test_runtimes_implement_the_seam(implementation: type, name: str) -> None:
    seam = members(Runtime)[name]
    impl = getattr(implementation, name)
    assert shape(impl) == shape(seam), f"{implementation.__name__}.{name}"
    assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(seam), name


def test_the_face_covers_what_callers_need() -> None:
    """The issue's list, so that nothing a caller may do is missing from the face."""
    needed = {
        "create", "get", "list", "destroy", "pause", "resume", "connect", "set_timeout", "ping", "snapshot",
        "fork", "exec", "exec_stream", "use", "route", "metrics", "events", "templates", "template",
        "build_template", "delete_template",
    }  # fmt: skip
    assert needed <= set(members(Sandboxes))
