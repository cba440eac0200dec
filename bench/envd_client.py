"""The host-side envd client: exec round trip and file transfer speed, against the official e2b SDK.

Starts one guest agent on a free loopback port and measures, in the same run against that agent:

* ``exec_rtt_p50_ms`` for ``true`` over N runs through our async client, our blocking client, our
  async client over h2c, and the ``e2b`` SDK (``Sandbox`` in debug mode pointed at the agent, its
  default HTTP/2). The SDK runs every command as ``/bin/bash -l -c <cmd>``; our clients run the same
  argv for the ``*_vs_e2b_ratio`` figures (same work in the guest), and plain ``true`` for the
  client's own figure.
* ``upload_mb_s`` / ``download_mb_s`` for one file through our client, and through the SDK as the
  baseline (``*_vs_e2b_ratio``).

Prints JSON lines ``{"figure", "value", "unit"}``.

    python bench/envd_client.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio

from wrenbox.envd import AsyncEnvdClient, EnvdClient, EnvdConfig

MiB = 1 << 20
SDK_TRUE = ["/bin/bash", "-l", "-c", "true"]  # what e2b's commands.run("true") starts


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit}), flush=True)


@contextmanager
def agent() -> Iterator[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "wrenbox.guest", "--listen", "127.0.0.1:0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        match = re.search(rb"http://[\d.]+:\d+", process.stdout.readline())
        if not match:
            raise SystemExit("the agent did not print its address")
        yield match[0].decode()
    finally:
        process.terminate()
        process.wait(10)


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(runs: int, call: Callable[[], object]) -> list[float]:
    call()  # warm: connection open, code paths loaded
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


async def atimed(runs: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    await call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def ours_async(url: str, runs: int, argv: list[str], http2: bool = False) -> float:
    async def measure() -> list[float]:
        async with AsyncEnvdClient(EnvdConfig(base_url=url, http2=http2)) as envd:
            await envd.wait_healthy()
            return await atimed(runs, lambda: envd.processes.exec(argv))

    return p50_ms(anyio.run(measure))


def ours_sync(url: str, runs: int, argv: list[str]) -> float:
    with EnvdClient(EnvdConfig(base_url=url)) as envd:
        return p50_ms(timed(runs, lambda: envd.processes.exec(argv)))


def e2b_sandbox(url: str):  # e2b is imported late: it reads its environment at import
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = url
    from e2b import Sandbox

    return Sandbox.create()


def transfers(url: str, workdir: Path, size: int) -> dict[str, float]:
    source = workdir / "source.bin"
    with source.open("wb") as out:
        for _ in range(size // MiB):
            out.write(os.urandom(MiB))
    remote, back = workdir / "remote.bin", workdir / "back.bin"
    mb = size / 1e6
    result: dict[str, float] = {}
    with EnvdClient(EnvdConfig(base_url=url)) as envd:
        start = time.perf_counter()
        envd.files.upload(str(remote), source)
        result["upload"] = mb / (time.perf_counter() - start)
        start = time.perf_counter()
        envd.files.download_to(str(remote), back)
        result["download"] = mb / (time.perf_counter() - start)
    sandbox = e2b_sandbox(url)
    with source.open("rb") as data:
        start = time.perf_counter()
        sandbox.files.write(str(remote), data)
        result["e2b_upload"] = mb / (time.perf_counter() - start)
    start = time.perf_counter()
    with back.open("wb") as out:
        for chunk in sandbox.files.read(str(remote), format="stream"):
            out.write(chunk)
    result["e2b_download"] = mb / (time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 runs and a 10 MB file (CI)")
    args = parser.parse_args()
    runs, size = (20, 10 * MiB) if args.quick else (100, 50 * MiB)

    with agent() as url, tempfile.TemporaryDirectory() as tmp:
        emit("exec_rtt_p50_ms", ours_async(url, runs, ["true"]), "ms")
        emit("exec_rtt_sync_p50_ms", ours_sync(url, runs, ["true"]), "ms")
        emit("exec_rtt_h2_p50_ms", ours_async(url, runs, ["true"], http2=True), "ms")
        ours_bash = ours_async(url, runs, SDK_TRUE)
        sandbox = e2b_sandbox(url)
        e2b = p50_ms(timed(runs, lambda: sandbox.commands.run("true")))
        emit("exec_rtt_bash_p50_ms", ours_bash, "ms")
        emit("e2b_exec_rtt_p50_ms", e2b, "ms")
        emit("exec_rtt_vs_e2b_ratio", ours_bash / e2b, "ratio")

        speeds = transfers(url, Path(tmp), size)
        for direction in ("upload", "download"):
            emit(f"{direction}_mb_s", speeds[direction], "MB/s")
            emit(f"e2b_{direction}_mb_s", speeds[f"e2b_{direction}"], "MB/s")
            emit(f"{direction}_vs_e2b_ratio", speeds[direction] / speeds[f"e2b_{direction}"], "ratio")


if __name__ == "__main__":
    main()
