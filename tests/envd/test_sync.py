"""Lifetime of the blocking facade's event loop thread."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

from wrenbox.envd import EnvdClient


def _loop_threads() -> int:
    return sum(thread.name == "wrenbox-envd" for thread in threading.enumerate())


def test_close_stops_the_loop_thread_and_is_idempotent() -> None:
    before = _loop_threads()
    with EnvdClient() as client:
        assert _loop_threads() == before + 1
    assert _loop_threads() == before
    client.close()


def test_a_forgotten_client_is_reclaimed_by_the_garbage_collector() -> None:
    before = _loop_threads()
    client = EnvdClient()
    assert _loop_threads() == before + 1
    del client
    gc.collect()
    assert _loop_threads() == before


def test_a_forgotten_client_does_not_hang_interpreter_exit() -> None:
    script = "from wrenbox.envd import EnvdClient\nclient = EnvdClient()\nprint('made')\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "made\n")
