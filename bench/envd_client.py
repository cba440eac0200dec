"""The host-side envd client: exec round trip and file transfer speed, against the official e2b SDK.

Starts one guest agent on a free loopback port; everything below runs against that agent, in one run,
with the cases taken in turns (so load from elsewhere on the host hits them alike):

* ``exec_rtt`` — ``true`` through our async client (HTTP/1.1), our blocking client, our async
  client over h2c.
* ``exec_rtt_bash`` vs ``e2b_exec_rtt_bash`` — the ``e2b`` SDK (``Sandbox`` in debug mode pointed at
  the agent, its default HTTP/2) runs every command as ``/bin/bash -l -c <cmd>``; our client runs the
  same argv, so the guest does the same work (HOME is an empty directory to keep host dotfiles out).
* ``unary_rtt`` vs ``e2b_unary_rtt`` — ``List`` processes: client + protocol cost without a spawn.
* ``upload_mb_s`` / ``download_mb_s`` for one file, ours vs the SDK's streamed write/read.

Prints JSON lines ``{"figure", "value", "unit"}``, every name prefixed ``envd_client_``; ``*_ratio``
is ours / e2b (lower is better for times, higher for speeds).

    python bench/envd_client.py [--quick]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from wrenbox.envd import AsyncEnvdClient, EnvdClient, EnvdConfig

MiB = 1 << 20
PREFIX = "envd_client_"  # bench/agent.py reports the agent's own figures under the bare names
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


def e2b_sandbox(url: str) -> Any:
    # e2b is imported late: it reads its environment at import time.
    os.environ["E2B_DEBUG"] = "true"
    os.environ["E2B_SANDBOX_URL"] = url
    from e2b import Sandbox

    return Sandbox.create()


async def round_trips(url: str, runs: int, home: str) -> dict[str, list[float]]:
    """Samples per case, taken in turns so that load from elsewhere on the host hits all alike."""
    sandbox = e2b_sandbox(url)
    # bash -l reads ~/.profile: an empty HOME keeps host dotfiles out of the comparison.
    envs = {"HOME": home}
    async with (
        AsyncEnvdClient(EnvdConfig(base_url=url)) as ours,
        AsyncEnvdClient(EnvdConfig(base_url=url, http2=True)) as ours_h2,
    ):
        with EnvdClient(EnvdConfig(base_url=url)) as ours_sync:
            cases: dict[str, Callable[[], Any]] = {
                "exec_rtt": lambda: ours.processes.exec(["true"]),
                "exec_rtt_sync": lambda: ours_sync.processes.exec(["true"]),
                "exec_rtt_h2": lambda: ours_h2.processes.exec(["true"]),
                "exec_rtt_bash": lambda: ours.processes.exec(SDK_TRUE, envs=envs),
                "e2b_exec_rtt_bash": lambda: sandbox.commands.run("true", envs=envs),
                "unary_rtt": lambda: ours.processes.list(),
                "e2b_unary_rtt": lambda: sandbox.commands.list(),
            }
            samples: dict[str, list[float]] = {name: [] for name in cases}
            for round_ in range(runs + 1):  # round 0 warms up: connections, code paths
                for name, call in cases.items():
                    start = time.perf_counter()
                    result = call()
                    if inspect.isawaitable(result):
                        await result
                    if round_:
                        samples[name].append(time.perf_counter() - start)
    return samples


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
        samples = anyio.run(round_trips, url, runs, tmp)
        for name, values in samples.items():
            emit(f"{PREFIX}{name}_p50_ms", p50_ms(values), "ms")
        for case in ("exec_rtt_bash", "unary_rtt"):
            ratio = p50_ms(samples[case]) / p50_ms(samples[f"e2b_{case}"])
            emit(f"{PREFIX}{case}_vs_e2b_ratio", ratio, "ratio")

        speeds = transfers(url, Path(tmp), size)
        for direction in ("upload", "download"):
            emit(f"{PREFIX}{direction}_mb_s", speeds[direction], "MB/s")
            emit(f"{PREFIX}e2b_{direction}_mb_s", speeds[f"e2b_{direction}"], "MB/s")
            ratio = speeds[direction] / speeds[f"e2b_{direction}"]
            emit(f"{PREFIX}{direction}_vs_e2b_ratio", ratio, "ratio")


if __name__ == "__main__":
    main()
