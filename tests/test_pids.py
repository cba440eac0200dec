from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from wrenbox.pids import ProcessRef


def test_terminate_ends_the_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ref = ProcessRef.of(child.pid)
    assert ref.alive()
    ref.terminate(grace=2)
    assert not ref.alive()
    assert child.poll() is not None


def test_sigkill_after_grace_when_sigterm_is_ignored() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "print('ok', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert child.stdout is not None
    assert child.stdout.readline() == b"ok\n"
    ref = ProcessRef.of(child.pid)
    started = time.monotonic()
    ref.terminate(grace=0.3)
    assert not ref.alive()
    assert time.monotonic() - started >= 0.3  # it waited out the grace period, then killed


def test_a_reused_pid_is_not_ours() -> None:
    child = subprocess.Popen(["sleep", "60"])
    ref = ProcessRef.of(child.pid)
    impostor = ProcessRef(child.pid, ref.start_time + 1)
    assert not impostor.alive()
    assert impostor.signal(9) is False
    assert child.poll() is None
    ref.terminate()


def test_of_a_missing_pid_raises() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        ProcessRef.of(child.pid)


# The main thread ends first: the thread-group leader shows as a zombie while another thread still runs,
# and it can only be reaped once that thread has exited too (as with QEMU quitting).
_LEADER_FIRST = (
    "import ctypes, os, threading, time;"
    "threading.Thread(target=lambda: (time.sleep(0.3), os._exit(0))).start();"
    "ctypes.CDLL(None).pthread_exit(None)"
)


def test_wait_gone_reaps_a_child_whose_leader_thread_exits_first() -> None:
    child = subprocess.Popen([sys.executable, "-c", _LEADER_FIRST])
    ref = ProcessRef.of(child.pid)
    time.sleep(0.1)  # the leader is a zombie now, its other thread sleeping
    assert ref.wait_gone(5)
    with pytest.raises(ChildProcessError):  # reaped: nothing left behind
        os.waitpid(child.pid, os.WNOHANG)
    child.returncode = 0  # reaped behind Popen's back; keep it from waiting again
