"""Sandbox benchmarks through the real manager (what a user of wrenbox waits for).

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``create_exec_p50_s``, ``create_exec_p95_s``
    ``create`` from the template, then the first ``exec true`` answered (N sandboxes, one at a time).
``pause_p50_s``            ``pause`` of a running sandbox that dirtied 32 MiB since it started (or resumed).
``resume_exec_p50_s``      ``resume``, then the first ``exec true`` answered.
``manager_exec_rtt_p50_ms`` ``exec true`` through the manager (100 runs after a warm-up).
``snapshot_size_ratio``    bytes the paused sandbox's memory snapshot occupies on disk (its diff files)
                           / non-zero bytes of its guest memory when the VM stopped for the pause (the
                           4 KiB blocks the snapshot's header maps to data: zero blocks are never
                           stored). Both come from ``metrics()`` of the paused sandbox. First pause: one
                           generation-0 file.
``snapshot_size_chain_ratio``  the same after the last of several pause/resume cycles (a chain of diffs:
                           pages rewritten since an older generation are stored in both until the
                           chain is collapsed at its generation cap).

``--compare-confinement`` runs everything four times in the same sitting, VMMs unconfined (``vmm.confine``
off: root, no jail, no seccomp, no cgroups), confined (the default), confined, unconfined, and prints each
figure's mean both ways and ``confined_vs_unconfined_<figure>`` (target ≤ 1.1 for the time figures).

Needs root and QEMU. Uses a temporary data dir sharing the cached guest image in
``$WRENBOX_TEST_DATA_DIR`` (default ``/var/tmp/wrenbox-test``); ``--quick`` takes fewer samples.

    python bench/sandbox.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator

import anyio

from common import figure, scratch_host
from wrenbox.config import LimitsConfig, SandboxDefaults, VmmConfig
from wrenbox.manager import CreateRequest, Sandboxes
from wrenbox.service import ensure_template, open_manager

DIRTY = "head -c 33554432 /dev/urandom > /dev/shm/dirty"


def p(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


async def timed_create(mgr: Sandboxes) -> tuple[str, float]:
    t0 = time.monotonic()
    sb = await mgr.create(CreateRequest())
    await mgr.exec(sb.id, "true")
    return sb.id, time.monotonic() - t0


async def latency_figures(mgr: Sandboxes, quick: bool) -> list[dict[str, object]]:
    creates = []
    for _ in range(3 if quick else 20):
        sid, seconds = await timed_create(mgr)
        creates.append(seconds)
        await mgr.destroy(sid)
    sb = await mgr.create(CreateRequest())
    await mgr.exec(sb.id, "true")
    rtts = []
    for _ in range(20 if quick else 100):
        t0 = time.monotonic()
        await mgr.exec(sb.id, "true")
        rtts.append(time.monotonic() - t0)
    await mgr.destroy(sb.id)
    return [
        figure("create_exec_p50_s", p(creates, 50), "s"),
        figure("create_exec_p95_s", p(creates, 95), "s"),
        figure("manager_exec_rtt_p50_ms", statistics.median(rtts) * 1000, "ms"),
    ]


async def pause_figures(mgr: Sandboxes, quick: bool) -> list[dict[str, object]]:
    sb = await mgr.create(CreateRequest())
    pauses, resumes, ratios = [], [], []
    for _ in range(2 if quick else 5):
        await mgr.exec(sb.id, DIRTY)
        t0 = time.monotonic()
        await mgr.pause(sb.id)
        pauses.append(time.monotonic() - t0)
        usage = (await mgr.metrics(sb.id)).host
        ratios.append(usage["snapshot_memory_file_bytes"] / usage["snapshot_memory_bytes"])
        t0 = time.monotonic()
        await mgr.resume(sb.id)
        await mgr.exec(sb.id, "true")
        resumes.append(time.monotonic() - t0)
    await mgr.destroy(sb.id)
    return [
        figure("pause_p50_s", statistics.median(pauses), "s"),
        figure("resume_exec_p50_s", statistics.median(resumes), "s"),
        figure("snapshot_size_ratio", ratios[0], "ratio"),
        figure("snapshot_size_chain_ratio", ratios[-1], "ratio"),
    ]


def figures(quick: bool, *, latency: bool = True, confine: bool = True) -> Iterator[dict[str, object]]:
    """All figures; ``latency=False`` only the pause/resume/snapshot-size group (for bench/memory.py)."""
    fields = {
        "vmm": VmmConfig(confine=confine),
        "defaults": SandboxDefaults(memory_mb=512, timeout_s=0),
        "limits": LimitsConfig(max_sandboxes=4),
    }
    with scratch_host("wbb", ("10.45.0.0/16", "10.46.0.0/16"), **fields) as settings:

        async def run() -> list[dict[str, object]]:
            async with open_manager(settings, reaper=False) as mgr:
                await ensure_template(mgr, settings)
                results = await latency_figures(mgr, quick) if latency else []
                return results + await pause_figures(mgr, quick)

        results = anyio.run(run)
    yield from results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples (about a minute)")
    parser.add_argument(
        "--compare-confinement", action="store_true", help="also run unconfined VMMs and print the ratios"
    )
    args = parser.parse_args(argv)
    if not args.compare_confinement:
        for item in figures(args.quick):
            print(json.dumps(item), flush=True)
        return 0
    # Unconfined, confined, confined, unconfined: drift over the sitting weighs on both sides alike.
    runs: dict[bool, dict[str, list[float]]] = {False: {}, True: {}}
    units: dict[str, str] = {}
    for confine in (False, True, True, False):
        for item in figures(args.quick, confine=confine):
            name = str(item["figure"])
            runs[confine].setdefault(name, []).append(float(item["value"]))  # type: ignore[arg-type]
            units[name] = str(item["unit"])
    for name, values in runs[True].items():
        base, value, unit = statistics.mean(runs[False][name]), statistics.mean(values), units[name]
        print(json.dumps(figure(f"unconfined_{name}", base, unit)), flush=True)
        print(json.dumps(figure(name, value, unit)), flush=True)
        if base:
            print(json.dumps(figure(f"confined_vs_unconfined_{name}", value / base, "ratio")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
