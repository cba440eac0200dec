"""Identity of long-lived child processes (QEMU, Firecracker, page servers) across restarts.

A bare PID is not an identity: after a crash and a reboot-free restart the PID may belong to someone
else. :class:`ProcessRef` pairs the PID with the process start time from ``/proc/<pid>/stat``; it is what
we persist, and every signal goes through it so wrenbox only ever ends processes it started.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

__all__ = ["ProcessRef"]


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; the fields after the last ')'
    # are unambiguous. Field 3 (state) is the first of them, so start time is at index 22 - 3.
    rest = stat[stat.rindex(b")") + 2 :].split()
    if rest[0] == b"Z":  # a zombie has exited; it only waits to be reaped
        return None
    return int(rest[22 - 3])


@dataclass(frozen=True, slots=True)
class ProcessRef:
    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        """Reference a running process; ProcessLookupError if it does not exist."""
        started = _start_time(pid)
        if started is None:
            raise ProcessLookupError(pid)
        return cls(pid, started)

    def alive(self) -> bool:
        """True while the very process we referenced is running (not a reused PID, not a zombie)."""
        return _start_time(self.pid) == self.start_time

    def signal(self, sig: int) -> bool:
        """Send ``sig`` if the process is still ours; False if it is already gone."""
        if not self.alive():
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def _reap(self) -> bool:
        """Reap it if it is our child and has ended; True when nothing is left for us to reap."""
        try:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (adopted after a restart): init reaps it
            return True
        return pid != 0

    def wait_gone(self, timeout: float) -> bool:
        """Wait until the process has ended and, if it is our child, been reaped."""
        deadline = time.monotonic() + timeout
        while True:
            # A thread-group leader shows as a zombie while its other threads are still exiting, and
            # cannot be reaped before they are gone: wait for the reap, not just for the zombie.
            if self._reap() and not self.alive():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def terminate(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Safe to call on a process that is gone."""
        self.signal(signal.SIGTERM)
        if self.wait_gone(grace):
            return
        self.signal(signal.SIGKILL)
        self.wait_gone(5.0)
