"""Shared fixtures. Component-specific fixtures live next to their tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
