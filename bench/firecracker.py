"""What the Firecracker driver adds around Firecracker itself (no Firecracker needed; run as root).

``fc_launch_ms``
    p50 wall time of the launcher (``wrenbox.vmm.firecracker.launch.launch_argv``: ``unshare -m`` +
    ``sh`` + a tmpfs mount + one link per disk + ``nsenter --net``) running ``/bin/true`` to its exit,
    with two disks, in a real network namespace.
``fc_launch_direct_ms`` / ``fc_launch_overhead_ms``
    The same ``/bin/true`` started directly, measured in the same rounds, and the difference: what each
    VM start pays for its private mount namespace and stable drive paths.
``fc_api_call_ms``
    p50 of one ``FirecrackerApi.get("/")`` (connect, h11 request, parse, JSON decode) against an
    in-process server on a Unix socket answering like Firecracker.
``fc_api_raw_ms`` / ``fc_api_call_ratio``
    The same exchange with hand-written bytes and no HTTP library (the floor), same rounds; the ratio
    api / raw (1.0 = the client costs nothing beyond the socket round trip).

Rounds interleave the variants, so load from other work hits them alike. ``--quick``: 20 rounds; else 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from wrenbox.command import run
from wrenbox.network.netns import NETNS_DIR, create_netns, remove_netns
from wrenbox.vmm.firecracker.api import FirecrackerApi
from wrenbox.vmm.firecracker.launch import launch_argv

INFO = json.dumps({"app_name": "Firecracker", "id": "i", "state": "Running", "vmm_version": "1.7.0"}).encode()
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(INFO),
    INFO,
)
REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit}), flush=True)


def launches(rounds: int, root: Path) -> None:
    disks = [root / "rootfs.ext4", root / "data.img"]
    for disk in disks:
        disk.write_bytes(b"")
    name = f"wbbench{secrets.token_hex(3)}"
    create_netns(name)
    try:
        chain = launch_argv(["/bin/true"], vm_dir=root / "vm", disks=disks, netns=NETNS_DIR / name)
        (root / "vm").mkdir()
        wrapped, direct = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            run(chain)
            t1 = time.perf_counter()
            run(["/bin/true"])
            t2 = time.perf_counter()
            wrapped.append(t1 - t0)
            direct.append(t2 - t1)
    finally:
        remove_netns(name)
    emit("fc_launch_ms", statistics.median(wrapped) * 1000, "ms")
    emit("fc_launch_direct_ms", statistics.median(direct) * 1000, "ms")
    emit("fc_launch_overhead_ms", (statistics.median(wrapped) - statistics.median(direct)) * 1000, "ms")


async def api_calls(rounds: int, root: Path) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(ANSWER)
        await writer.drain()
        writer.close()

    socket_path = root / "api.sock"
    server = await asyncio.start_unix_server(answer, path=str(socket_path))
    api = FirecrackerApi(socket_path)
    client, raw = [], []
    async with server:
        for _ in range(rounds):
            t0 = time.perf_counter()
            assert (await api.get("/"))["state"] == "Running"
            t1 = time.perf_counter()
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            writer.write(REQUEST)
            data = await reader.read()
            writer.close()
            assert json.loads(data.split(b"\r\n\r\n", 1)[1])["state"] == "Running"
            t2 = time.perf_counter()
            client.append(t1 - t0)
            raw.append(t2 - t1)
    emit("fc_api_call_ms", statistics.median(client) * 1000, "ms")
    emit("fc_api_raw_ms", statistics.median(raw) * 1000, "ms")
    emit("fc_api_call_ratio", statistics.median(client) / statistics.median(raw), "ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds instead of 200")
    rounds = 20 if parser.parse_args().quick else 200
    with tempfile.TemporaryDirectory(prefix="wrenbox-bench-fc-") as tmp:
        launches(rounds, Path(tmp))
        asyncio.run(api_calls(rounds, Path(tmp)))


if __name__ == "__main__":
    main()
