"""Guest agent benchmark: cold start, exec round trip, file upload and download.

Prints one JSON line per figure: ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``. Each figure has a
baseline measured in the same run, and a ratio against it:

- ``agent_cold_start_s``: spawn ``python -m wrenbox.guest`` until ``/health`` answers; baseline: spawn
  ``python -c pass`` until it exits (the interpreter's own start).
- ``agent_cold_start_first_exec_s``: spawn until a first ``true`` ran (the RPC modules load after
  ``/health`` already answers).
- ``agent_exec_rtt_p50_ms`` / ``agent_exec_rtt_p95_ms``: run ``true`` through raw Connect to an agent
  process on this host (Start stream, HTTP/1.1 keep-alive; no VM); baseline: ``subprocess.run(["true"])``
  here. ``agent_sdk_run_true_p50_ms``: ``commands.run("true")`` through the official e2b SDK to the same
  agent, which wraps every command in ``bash -l -c``; baseline: that login shell run here.
- ``upload_mb_s`` / ``download_mb_s``: median of several transfers of one file over ``POST``/``GET
  /files``, each checked by content (SHA-256 of what the agent stored, and of what came back); baseline:
  writing and reading the same bytes to and from the same directory directly, as many times.

Usage: ``python bench/agent.py [--quick]`` (quick: fewer runs, a 10 MB file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from wrenbox.pids import ProcessRef
from wrenbox.proto.process import process_pb as pb

MB = 1_000_000


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit}), flush=True)


def start_agent() -> tuple[subprocess.Popen[str], str, float]:
    """(process, url, seconds from spawn until /health answered)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "wrenbox.guest", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    match = re.fullmatch(r"listening on (http://\S+)\n", process.stdout.readline())
    if not match:
        process.kill()
        raise SystemExit("agent did not start")
    url = match[1]
    with httpx.Client() as client:
        while True:
            try:
                if client.get(url + "/health", timeout=1).status_code == 204:
                    break
            except httpx.TransportError:
                time.sleep(0.002)
    return process, url, time.perf_counter() - started


def stop_agent(process: subprocess.Popen[str]) -> None:
    ProcessRef.of(process.pid).terminate(grace=5)
    process.wait()


def cold_start(runs: int) -> None:
    agent_times, first_exec_times, python_times = [], [], []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        process, url, elapsed = start_agent()
        with httpx.Client(base_url=url, timeout=30) as client:
            run_true(client)  # waits for the RPC machinery, which loads after /health answers
        first_exec_times.append(time.perf_counter() - t)
        agent_times.append(elapsed)
        stop_agent(process)
    agent, python = statistics.median(agent_times), statistics.median(python_times)
    emit("agent_cold_start_s", agent, "s")
    emit("agent_cold_start_first_exec_s", statistics.median(first_exec_times), "s")
    emit("python_start_s", python, "s")
    emit("agent_cold_start_vs_python_start", agent / python, "ratio")


def run_true(client: httpx.Client) -> None:
    request = pb.StartRequest(process=pb.ProcessConfig(cmd="true"), stdin=False)
    payload = request.to_binary()
    body = len(payload).to_bytes(5, "big") + payload  # flags byte 0, then the 4-byte length
    response = client.post(
        "/process.Process/Start", content=body, headers={"content-type": "application/connect+proto"}
    )
    frames = response.content
    offset = 0
    while offset < len(frames):
        flags, length = frames[offset], int.from_bytes(frames[offset + 1 : offset + 5], "big")
        if flags & 0x02:
            if frames[offset + 5 : offset + 5 + length] not in (b"{}", b""):
                raise SystemExit(f"exec failed: {frames[offset + 5 :]!r}")
            return
        event = pb.StartResponse.from_binary(frames[offset + 5 : offset + 5 + length]).event.event
        if event.field == "end" and event.value.exit_code != 0:
            raise SystemExit("true did not exit 0")
        offset += 5 + length


def exec_rtt(url: str, runs: int) -> None:
    times = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(runs + 3):
            t = time.perf_counter()
            run_true(client)
            if i >= 3:  # the first calls load the RPC machinery and open the connection
                times.append(time.perf_counter() - t)
    local = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(["true"], check=True)
        local.append(time.perf_counter() - t)
    connect, baseline = statistics.median(times) * 1000, statistics.median(local) * 1000
    emit("agent_exec_rtt_p50_ms", connect, "ms")
    emit("agent_exec_rtt_p95_ms", sorted(times)[int(len(times) * 0.95) - 1] * 1000, "ms")
    emit("local_spawn_true_p50_ms", baseline, "ms")
    emit("agent_exec_rtt_vs_local_spawn", connect / baseline, "ratio")

    from e2b import Sandbox

    # The SDK runs every command as `/bin/bash -l -c CMD`: a login shell, which is most of its cost.
    sandbox = Sandbox.create(debug=True, sandbox_url=url)
    sdk_times, login_shell = [], []
    for i in range(runs + 3):
        t = time.perf_counter()
        sandbox.commands.run("true")
        if i >= 3:
            sdk_times.append(time.perf_counter() - t)
    for _ in range(max(runs // 4, 5)):
        t = time.perf_counter()
        subprocess.run(["/bin/bash", "-l", "-c", "true"], check=True)
        login_shell.append(time.perf_counter() - t)
    sdk, shell = statistics.median(sdk_times) * 1000, statistics.median(login_shell) * 1000
    emit("agent_sdk_run_true_p50_ms", sdk, "ms")
    emit("local_login_shell_true_p50_ms", shell, "ms")
    emit("agent_sdk_run_true_vs_local_login_shell", sdk / shell, "ratio")


def transfer(url: str, size: int, runs: int) -> None:
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    uploads, downloads, writes, reads = [], [], [], []
    with (
        tempfile.TemporaryDirectory(prefix="wrenbox-bench-") as tmp,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        for i in range(runs):
            target, direct = Path(tmp) / f"upload-{i}.bin", Path(tmp) / f"direct-{i}.bin"
            uploads.append(_upload(client, target, data))
            if hashlib.sha256(target.read_bytes()).hexdigest() != digest:
                raise SystemExit(f"the agent stored other bytes than were uploaded in {target}")
            seconds, received = _download(client, target)
            if received != digest:
                raise SystemExit(f"downloaded other bytes than {target} holds")
            downloads.append(seconds)
            t = time.perf_counter()
            direct.write_bytes(data)
            writes.append(time.perf_counter() - t)
            t = time.perf_counter()
            with direct.open("rb") as f:
                while f.read(1 << 20):
                    pass
            reads.append(time.perf_counter() - t)
            target.unlink()
            direct.unlink()
    upload, download = statistics.median(uploads), statistics.median(downloads)
    write, read = statistics.median(writes), statistics.median(reads)
    emit("upload_mb_s", size / MB / upload, "MB/s")
    emit("download_mb_s", size / MB / download, "MB/s")
    emit("local_write_mb_s", size / MB / write, "MB/s")
    emit("local_read_mb_s", size / MB / read, "MB/s")
    emit("upload_vs_local_write", write / upload, "ratio")
    emit("download_vs_local_read", read / download, "ratio")


def _upload(client: httpx.Client, target: Path, data: bytes) -> float:
    t = time.perf_counter()
    response = client.post(
        "/files",
        params={"path": str(target)},
        content=(data[i : i + (1 << 20)] for i in range(0, len(data), 1 << 20)),
        headers={"content-type": "application/octet-stream"},
    )
    elapsed = time.perf_counter() - t
    response.raise_for_status()
    return elapsed


def _download(client: httpx.Client, target: Path) -> tuple[float, str]:
    """(seconds, SHA-256 of the bytes received); hashing is outside the timing."""
    chunks = []
    t = time.perf_counter()
    identity = {"accept-encoding": "identity"}
    with client.stream("GET", "/files", params={"path": str(target)}, headers=identity) as download:
        chunks.extend(download.iter_raw())
    elapsed = time.perf_counter() - t
    return elapsed, hashlib.sha256(b"".join(chunks)).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and a 10 MB file (for CI)")
    args = parser.parse_args()
    cold_start(runs=3 if args.quick else 10)
    process, url, _ = start_agent()
    try:
        exec_rtt(url, runs=20 if args.quick else 100)
        transfer(url, size=(10 if args.quick else 50) * MB, runs=3 if args.quick else 5)
    finally:
        stop_agent(process)


if __name__ == "__main__":
    main()
