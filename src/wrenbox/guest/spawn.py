"""Starting a client's process: credentials, working directory, pipes or a PTY, in its own session.

The agent keeps the raw fds (never Popen's file objects) and reads and writes them on its event loop;
see :mod:`wrenbox.guest.processes`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from dataclasses import dataclass
from typing import Literal, TypeAlias

from wrenbox.errors import InvalidArgument, NotFound, PermissionDenied, WrenboxError

from . import pty
from .users import User

__all__ = ["Launched", "OutputKind", "Spawn", "launch"]

OutputKind: TypeAlias = Literal["stdout", "stderr", "pty"]


@dataclass(frozen=True, slots=True)
class Spawn:
    """Everything needed to start one process (already resolved and validated by the caller)."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: User
    tag: str | None = None
    stdin: bool = True
    pty_size: tuple[int, int] | None = None  # (cols, rows)


@dataclass(frozen=True, slots=True)
class Launched:
    popen: subprocess.Popen[bytes]
    outputs: dict[int, OutputKind]  # fds to read, non-blocking
    input_fd: int | None  # stdin pipe or PTY master, non-blocking; None without stdin


def launch(spawn: Spawn) -> Launched:
    """Start the process (its own session and process group), or raise a wrenbox error."""
    spawn.user.check_can_act_as()
    if not os.path.isdir(spawn.cwd):
        raise InvalidArgument(f"cwd {spawn.cwd!r} does not exist")
    credentials: dict[str, object] = {}
    if os.geteuid() == 0 and spawn.user.uid != 0:
        credentials = {"user": spawn.user.uid, "group": spawn.user.gid, "extra_groups": spawn.user.groups()}
    if spawn.pty_size is not None:
        return _launch_pty(spawn, credentials)
    # Our own pipes (not Popen's file objects): the agent reads and writes the raw fds.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    in_r, in_w = os.pipe2(os.O_CLOEXEC) if spawn.stdin else (subprocess.DEVNULL, None)
    child_ends = [out_w, err_w] + ([in_r] if in_w is not None else [])
    try:
        popen = subprocess.Popen(
            spawn.argv,
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
            cwd=spawn.cwd,
            env=spawn.env,
            start_new_session=True,
            **credentials,  # type: ignore[arg-type]
        )
    except BaseException as err:
        for fd in (out_r, err_r, *([in_w] if in_w is not None else [])):
            os.close(fd)
        if isinstance(err, OSError):
            raise _spawn_error(err, spawn) from None
        raise
    finally:
        for fd in child_ends:
            os.close(fd)
    outputs: dict[int, OutputKind] = {out_r: "stdout", err_r: "stderr"}
    for fd in (out_r, err_r, *([in_w] if in_w is not None else [])):
        os.set_blocking(fd, False)
    input_fd = in_w
    _lower_oom_priority(popen.pid)
    return Launched(popen, outputs, input_fd)


def _launch_pty(spawn: Spawn, credentials: dict[str, object]) -> Launched:
    assert spawn.pty_size is not None
    master, slave = pty.open_pty(*spawn.pty_size)
    try:
        popen = subprocess.Popen(
            spawn.argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=spawn.cwd,
            env=spawn.env,
            start_new_session=True,
            preexec_fn=pty.make_controlling_terminal,
            **credentials,  # type: ignore[arg-type]
        )
    except OSError as err:
        os.close(master)
        raise _spawn_error(err, spawn) from None
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    _lower_oom_priority(popen.pid)
    return Launched(popen, {master: "pty"}, master)


def _spawn_error(err: OSError, spawn: Spawn) -> WrenboxError:
    if isinstance(err, FileNotFoundError):
        return NotFound(f"command {spawn.argv[0]!r} not found")
    if isinstance(err, PermissionError):
        return PermissionDenied(f"cannot execute {spawn.argv[0]!r}: {err.strerror}")
    return InvalidArgument(f"cannot start {spawn.argv[0]!r}: {err.strerror or err}")


def _lower_oom_priority(pid: int) -> None:
    # As envd: user processes are what the OOM killer should pick, never the agent.
    with contextlib.suppress(OSError), open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write("100")
