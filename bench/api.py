"""What the front door costs: the same work through ``wrenbox serve`` and without it, in one run.

Prints one JSON line per figure, ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``:

``manager_create_exec_p50_s``  in-process ``create`` from the template, then the first ``exec true``.
``api_create_exec_p50_s``      the same through the server with E2B's SDK: ``Sandbox.create``, then the
                               first ``commands.run("true")`` (REST create, then envd through the proxy).
``api_create_overhead_ratio``  api / manager (target <= 1.15).
``direct_exec_rtt_p50_ms``     ``exec true`` with wrenbox's envd client straight at the guest's address.
``proxy_exec_rtt_p50_ms``      the same client through the server's proxy (routing headers).
``proxy_rtt_ratio``            proxy / direct (target <= 1.2).
``sdk_run_rtt_p50_ms``         E2B's SDK's ``commands.run("true")`` through the proxy, for comparison: the
                               client's own cost per command, which ``api_create_exec`` pays once.
``direct_upload_mb_s``, ``proxy_upload_mb_s``, ``proxy_upload_ratio`` (target >= 0.8): one file of
                               64 MiB (16 with ``--quick``) written to the guest's /tmp (tmpfs-backed
                               disk cache), MB = 10^6 bytes;
``direct_download_mb_s``, ``proxy_download_mb_s``, ``proxy_download_ratio``: the same file read back.

The two sides run one after the other on one data dir (the server holds its lock), in rounds that
alternate which side goes first, so drift on this noisy machine falls on both. Needs root and QEMU;
shares the cached guest image in ``$WRENBOX_TEST_DATA_DIR`` (default ``/var/tmp/wrenbox-test``).

    python bench/api.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import anyio
import httpx

from common import Server, figure, scratch_host
from wrenbox.config import LimitsConfig, SandboxDefaults, Settings
from wrenbox.envd import ENVD_PORT, AsyncEnvdClient, EnvdConfig
from wrenbox.manager import CreateRequest
from wrenbox.service import ensure_template, open_manager

TEMPLATE = "minimal"
Samples = dict[str, list[float]]


async def envd_figures(client: AsyncEnvdClient, samples: Samples, side: str, rtts: int, size: int) -> None:
    """RTT of ``exec true`` and one upload and download of ``size`` bytes, through ``client``."""
    await client.processes.exec("true")  # warm: connection open, code paths hot
    for _ in range(rtts):
        t0 = time.perf_counter()
        await client.processes.exec("true")
        samples.setdefault(f"{side}_rtt", []).append(time.perf_counter() - t0)
    data = os.urandom(size)
    t0 = time.perf_counter()
    await client.files.upload("/tmp/bench.bin", data)
    samples.setdefault(f"{side}_upload", []).append(size / (time.perf_counter() - t0) / 1e6)
    t0 = time.perf_counter()
    got = 0
    async with client.files.download("/tmp/bench.bin") as chunks:
        async for chunk in chunks:
            got += len(chunk)
    assert got == size, (got, size)
    samples.setdefault(f"{side}_download", []).append(size / (time.perf_counter() - t0) / 1e6)


def in_process(settings: Settings, samples: Samples, creates: int, rtts: int, size: int) -> None:
    async def run() -> None:
        async with open_manager(settings, reaper=False) as mgr:
            await ensure_template(mgr, settings, TEMPLATE)
            for _ in range(creates):
                t0 = time.perf_counter()
                sb = await mgr.create(CreateRequest(template=TEMPLATE))
                await mgr.exec(sb.id, "true")
                samples.setdefault("manager_create", []).append(time.perf_counter() - t0)
                await mgr.destroy(sb.id)
            sb = await mgr.create(CreateRequest(template=TEMPLATE))
            async with mgr.route(sb.id, ENVD_PORT) as address:
                config = EnvdConfig(f"http://{address.host}:{address.port}", access_token=sb.access_token)
                async with AsyncEnvdClient(config) as client:
                    await envd_figures(client, samples, "direct", rtts, size)
            await mgr.destroy(sb.id)

    anyio.run(run)


def through_server(settings: Settings, samples: Samples, creates: int, rtts: int, size: int) -> None:
    from e2b import Sandbox

    with Server(settings, templates=(TEMPLATE,)) as server:
        opts = {"api_key": server.key, "api_url": server.url, "sandbox_url": server.url}
        for _ in range(creates):
            t0 = time.perf_counter()
            sb = Sandbox.create(TEMPLATE, **opts)
            sb.commands.run("true")
            samples.setdefault("api_create", []).append(time.perf_counter() - t0)
            sb.kill()
        sb = Sandbox.create(TEMPLATE, **opts)
        sb.commands.run("true")
        for _ in range(rtts):
            t0 = time.perf_counter()
            sb.commands.run("true")
            samples.setdefault("sdk_rtt", []).append(time.perf_counter() - t0)
        headers = {"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
        detail = httpx.get(f"{server.url}/sandboxes/{sb.sandbox_id}", headers={"X-API-KEY": server.key})
        config = EnvdConfig(server.url, access_token=detail.json()["envdAccessToken"], headers=headers)

        async def run() -> None:
            async with AsyncEnvdClient(config) as client:
                await envd_figures(client, samples, "proxy", rtts, size)

        anyio.run(run)
        sb.kill()


def figures(quick: bool) -> list[dict[str, object]]:
    rounds, creates, rtts = (2, 3, 30) if quick else (3, 7, 100)
    size = (16 if quick else 64) << 20
    samples: Samples = {}
    sides: list[Callable[[Settings, Samples, int, int, int], None]] = [in_process, through_server]
    fields = {
        "defaults": SandboxDefaults(memory_mb=512, timeout_s=0),
        "limits": LimitsConfig(max_sandboxes=4),
    }
    with scratch_host("wbp", ("10.49.0.0/16", "10.50.0.0/16"), **fields) as settings:
        for n in range(rounds):
            for side in sides if n % 2 == 0 else reversed(sides):
                side(settings, samples, creates, rtts, size)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return [
        figure("manager_create_exec_p50_s", med["manager_create"], "s"),
        figure("api_create_exec_p50_s", med["api_create"], "s"),
        figure("api_create_overhead_ratio", med["api_create"] / med["manager_create"], "ratio"),
        figure("direct_exec_rtt_p50_ms", med["direct_rtt"] * 1000, "ms"),
        figure("proxy_exec_rtt_p50_ms", med["proxy_rtt"] * 1000, "ms"),
        figure("proxy_rtt_ratio", med["proxy_rtt"] / med["direct_rtt"], "ratio"),
        figure("sdk_run_rtt_p50_ms", med["sdk_rtt"] * 1000, "ms"),
        figure("direct_upload_mb_s", med["direct_upload"], "MB/s"),
        figure("proxy_upload_mb_s", med["proxy_upload"], "MB/s"),
        figure("proxy_upload_ratio", med["proxy_upload"] / med["direct_upload"], "ratio"),
        figure("direct_download_mb_s", med["direct_download"], "MB/s"),
        figure("proxy_download_mb_s", med["proxy_download"], "MB/s"),
        figure("proxy_download_ratio", med["proxy_download"] / med["direct_download"], "ratio"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few samples (a few minutes)")
    args = parser.parse_args(argv)
    for item in figures(args.quick):
        print(json.dumps(item), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
