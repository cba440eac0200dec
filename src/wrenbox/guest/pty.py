"""Pseudo-terminals for interactive processes: open, size, and make one the controlling terminal."""

from __future__ import annotations

import fcntl
import os
import struct
import termios

__all__ = ["make_controlling_terminal", "open_pty", "set_size"]


def open_pty(cols: int, rows: int) -> tuple[int, int]:
    """A new (master, slave) pair sized ``cols`` x ``rows``; the master is non-blocking."""
    master, slave = os.openpty()
    try:
        set_size(slave, cols, rows)
        os.set_blocking(master, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def set_size(fd: int, cols: int, rows: int) -> None:
    """Resize; the kernel sends SIGWINCH to the terminal's foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", _clamp(rows), _clamp(cols), 0, 0))


def make_controlling_terminal() -> None:
    """Run in the child between fork and exec, after setsid: stdin (the slave) becomes its tty.

    Only an ioctl on an inherited fd happens here, so it is safe in the forked child.
    """
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _clamp(value: int) -> int:
    # A zero size confuses full-screen programs; the kernel field is 16 bits.
    return min(max(value, 1), 0xFFFF)
