"""Sandbox metrics over time: every running sandbox sampled every few seconds, kept for an hour.

E2B's ``GET /sandboxes/{id}/metrics?start=&end=`` answers with a series, so someone has to take it.
Reading metrics is observation, not use: it does not keep a sandbox from timing out. Samples live in
memory (a restarted server starts a fresh series) and go when the sandbox does.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import anyio

from wrenbox.envd import Metrics
from wrenbox.errors import WrenboxError
from wrenbox.manager import Sandboxes
from wrenbox.records import SandboxState

__all__ = ["MetricsSampler", "Sample"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # unix seconds
    guest: Metrics


class MetricsSampler:
    def __init__(self, sandboxes: Sandboxes, *, interval_s: float = 5.0, keep: int = 720) -> None:
        self.sandboxes = sandboxes
        self.interval_s = interval_s
        self._series: dict[str, deque[Sample]] = {}
        self._keep = keep

    def series(self, sandbox_id: str, start: float | None = None, end: float | None = None) -> list[Sample]:
        samples = self._series.get(sandbox_id, ())
        return [s for s in samples if (start is None or s.at >= start) and (end is None or s.at <= end)]

    async def sample(self, sandbox_id: str) -> None:
        try:
            m = await self.sandboxes.metrics(sandbox_id)
        except WrenboxError as exc:  # paused or gone meanwhile; the next round sees that
            log.debug("metrics of %s: %s", sandbox_id, exc)
            return
        if m.guest is not None:
            # The host's clock: a restored guest's clock lags until it is set again.
            series = self._series.setdefault(sandbox_id, deque(maxlen=self._keep))
            series.append(Sample(time.time(), m.guest))

    async def sweep(self) -> None:
        kept = self.sandboxes.list(states={SandboxState.RUNNING, SandboxState.PAUSED})
        running = {r.id for r in kept if r.state is SandboxState.RUNNING}
        live = {r.id for r in kept}
        for gone in set(self._series) - live:
            del self._series[gone]
        async with anyio.create_task_group() as tg:
            for sandbox_id in running:
                tg.start_soon(self.sample, sandbox_id)

    async def run(self) -> None:
        while True:
            await self.sweep()
            await anyio.sleep(self.interval_s)
