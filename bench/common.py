"""What the benchmarks share: the cached guest image, the JSON figure, and ``wrenbox serve`` on a bench's data
dir. Bench scripts run as ``python bench/NAME.py``, so this is importable as ``common``."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from wrenbox.config import Settings

CACHE = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def figure(name: str, value: float, unit: str) -> dict[str, object]:
    return {"figure": name, "value": round(value, 4), "unit": unit}


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
