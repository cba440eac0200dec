"""Data integrity on real VMs: random data in guest RAM (tmpfs) and on the guest disk is hashed inside
the guest against what the host wrote, after every pause/resume cycle and in every fork child. The
memory snapshot grows as a chain of diffs, collapses at its cap, and a background process lives on."""

from __future__ import annotations

import dataclasses
import os

import pytest

from wrenbox.config import Settings
from wrenbox.manager import CreateRequest, SandboxManager
from wrenbox.memory.chain import Chain
from wrenbox.memory.process import MemoryConfig
from wrenbox.service import Host

from .conftest import leftovers
from .guest import (
    Contents,
    counter,
    guest_sha256,
    memory_header,
    sha256,
    start_counter,
    upload,
)

pytestmark = [pytest.mark.anyio, pytest.mark.vm, pytest.mark.root]
CYCLES = 5
MIB = 1 << 20
# Written once before the first pause and never again: read back through ever longer chains.
STILL = {"/dev/shm/still.bin": 4 * MIB, "/home/user/still.bin": 4 * MIB}


async def _mismatches(
    mgr: SandboxManager, sandbox_id: str, still: dict[str, bytes], fresh: Contents
) -> list[str]:
    paths = list(still)
    found = await guest_sha256(mgr, sandbox_id, *paths, from_disk=True)
    bad = [p for p, h in zip(paths, found, strict=True) if h != sha256(still[p])]
    return bad + await fresh.check(mgr, sandbox_id)


async def test_data_and_processes_survive_pause_resume_cycles_and_forks(
    host: Host, manager: SandboxManager, settings: Settings
) -> None:
    sb = await manager.create(CreateRequest())
    still = {path: os.urandom(size) for path, size in STILL.items()}
    for path, data in still.items():
        await upload(manager, sb.id, path, data)
    pid = await start_counter(manager, sb.id)
    mismatches: dict[str, list[str]] = {}
    headers = []
    count = await counter(manager, sb.id)

    for cycle in range(1, CYCLES + 1):
        fresh = Contents.random(2 * MIB)  # new data every cycle, so every diff carries real changes
        await fresh.write(manager, sb.id)
        await manager.pause(sb.id)
        headers.append(memory_header(host.runtime, sb.id))
        with Chain.open(host.runtime.files.snapshot_dir(sb.id)):  # every diff file's checksum verifies
            pass
        await manager.resume(sb.id)
        mismatches[f"cycle {cycle}"] = await _mismatches(manager, sb.id, still, fresh)
        async with manager.use(sb.id) as envd:
            assert pid in [p.pid for p in await envd.processes.list()], f"the counter died in cycle {cycle}"
        assert await counter(manager, sb.id) > count, f"the counter stopped in cycle {cycle}"
        count = await counter(manager, sb.id)
    assert mismatches == {f"cycle {n}": [] for n in range(1, CYCLES + 1)}

    # The chain: generation 0 is the full memory, each pause adds one generation holding a diff much
    # smaller than the full, and keeps referring to the older diffs it did not replace.
    assert [h.generation for h in headers] == list(range(CYCLES))
    assert len({h.build_id for h in headers}) == CYCLES
    assert {h.base_build_id for h in headers} == {headers[0].build_id}
    full = headers[0].file(headers[0].build_id).length
    for h in headers[1:]:
        assert 2 * MIB < h.file(h.build_id).length < full / 2
        assert headers[0].build_id in h.builds  # the still data lives on in generation 0
    assert len(headers[-1].files) > 1

    # At the cap the chain collapses into one generation 0, and nothing is lost.
    rt = host.runtime
    config = rt.config
    rt.config = dataclasses.replace(config, memory=MemoryConfig(max_generations=CYCLES))
    try:
        fresh = Contents.random(2 * MIB)
        await fresh.write(manager, sb.id)
        await manager.pause(sb.id)
    finally:
        rt.config = config
    collapsed = memory_header(host.runtime, sb.id)
    assert (collapsed.generation, len(collapsed.files)) == (0, 1)
    assert sorted(p.name for p in host.runtime.files.snapshot_dir(sb.id).glob("memfile.*")) == sorted(
        ["memfile.header", f"memfile.{collapsed.build_id}"]
    )
    await manager.resume(sb.id)
    assert await _mismatches(manager, sb.id, still, fresh) == []

    # Forks: every child, and the source, holds exactly the same data and the same running process.
    children = await manager.fork(sb.id, 2)
    for rec in (*children, manager.get(sb.id)):
        assert await _mismatches(manager, rec.id, still, fresh) == [], f"fork {rec.id} differs"
        async with manager.use(rec.id) as envd:
            assert pid in [p.pid for p in await envd.processes.list()]
    for rec in (*children, manager.get(sb.id)):
        await manager.destroy(rec.id)
    assert leftovers(settings) == {}
