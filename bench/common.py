"""What the benchmarks share: the cached guest image, the JSON figure, and ``wrenbox serve`` on a bench's data
dir. Bench scripts run as ``python bench/NAME.py``, so this is importable as ``common``."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from wrenbox.config import Settings
from wrenbox.images import build_image
from wrenbox.network import Network, NetworkConfig
from wrenbox.service import image_config

CACHE = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def figure(name: str, value: float, unit: str) -> dict[str, object]:
    return {"figure": name, "value": round(value, 4), "unit": unit}


@contextmanager
def scratch_host(tag: str, ranges: tuple[str, str], **fields: Any) -> Iterator[Settings]:
    """Settings for a data dir of the bench's own (under /var/tmp, sharing the cached guest image) with a
    network prefix and a RAM dir named from ``tag``, the host and transfer ``ranges``, sandboxes destroyed
    on shutdown, and ``fields``; whatever was made in it is removed when the block ends.

    ``WRENBOX_TEST_NET`` moves both ranges as it moves the test suites' (``tests/support/ranges.py``), so
    two checkouts can run the same bench at once without their slots' addresses meeting."""
    ranges = _shifted(ranges)
    build_image(image_config(Settings(data_dir=CACHE)), "minimal")
    root = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir="/var/tmp"))
    (root / "images").symlink_to(CACHE / "images")
    (root / "host").symlink_to(CACHE / "host")
    suffix = secrets.token_hex(2)
    network = NetworkConfig(prefix=f"{tag}{suffix}", host_range=ranges[0], transfer_range=ranges[1])
    settings = Settings(
        data_dir=root,
        memory_dir=Path(f"/dev/shm/{tag}-{suffix}"),
        on_shutdown="destroy",
        network=network,
        **fields,
    )
    try:
        yield settings
    finally:
        anyio.run(Network(settings.network).teardown)
        shutil.rmtree(settings.memory_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


def _shifted(ranges: tuple[str, str]) -> tuple[str, str]:
    shift = 20 * int(os.environ.get("WRENBOX_TEST_NET", "0"))

    def move(cidr: str) -> str:
        a, b, rest = cidr.split(".", 2)
        return f"{a}.{int(b) + shift}.{rest}"

    return move(ranges[0]), move(ranges[1])


class Server:
    """``wrenbox serve`` on the bench's data dir, and a key for it."""

    def __init__(self, settings: Settings, *, templates: tuple[str, ...] = ("minimal",)) -> None:
        self.env = {
            **os.environ,
            "WRENBOX_DATA_DIR": str(settings.data_dir),
            "WRENBOX_MEMORY_DIR": str(settings.memory_dir),
            "WRENBOX_ON_SHUTDOWN": "destroy",
            "WRENBOX_NETWORK__PREFIX": settings.network.prefix,
            "WRENBOX_NETWORK__HOST_RANGE": str(settings.network.host_range),
            "WRENBOX_NETWORK__TRANSFER_RANGE": str(settings.network.transfer_range),
            "WRENBOX_DEFAULTS__MEMORY_MB": str(settings.defaults.memory_mb),
            "WRENBOX_DEFAULTS__TIMEOUT_S": "0",
            "WRENBOX_API__TEMPLATES": json.dumps(list(templates)),
        }
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = json.loads(self._cli("keys", "create", "--name", "bench", "--json").stdout)["key"]
        self.process: subprocess.Popen[str] | None = None

    def _cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        code = "from wrenbox.cli import main; main()"
        return subprocess.run(
            [sys.executable, "-c", code, *args], env=self.env, capture_output=True, text=True, check=True
        )

    def __enter__(self) -> Server:
        code = "from wrenbox.cli import main; main()"
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--listen", f"127.0.0.1:{self.port}"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not re.search(r"wrenbox serving on", line):
            self.process.kill()
            raise SystemExit(f"the server did not start: {line!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
