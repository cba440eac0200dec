"""``wrenbox demo`` (what ``make demo`` runs) on real VMs: every step passes, in order, and leaves nothing."""

from __future__ import annotations

import pytest

from wrenbox.config import Settings
from wrenbox.demo import STEPS, DemoStep, run_demo

from .conftest import leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


async def test_the_demo_runs_every_step(settings: Settings) -> None:
    steps: list[DemoStep] = []
    assert await run_demo(settings, steps.append)
    assert [(s.step, s.ok) for s in steps] == [(name, True) for name in STEPS]
    assert leftovers(settings) == {}
