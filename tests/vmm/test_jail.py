"""The VMM's jail without a VM: what ``enter_jail`` builds and refuses, and the RAM directory's checks
(security finding 4: a local user who made ``/dev/shm/wrenbox`` first, or planted a link in it).

The VM-level proof (a real QEMU's uid, seccomp, root and cgroups) is ``tests/sandbox/test_confinement.py``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from wrenbox.errors import PermissionDenied
from wrenbox.fileio import private_dir
from wrenbox.runtime.files import SandboxFiles
from wrenbox.vmm.jail import Confinement, JailSpec

pytestmark = pytest.mark.root

NOBODY = 65534
ME = Confinement(uid=2_000_000_999, gid=2_000_000_000)


def _jailed(spec: JailSpec, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spec.argv(list(command)), capture_output=True, text=True, timeout=30, check=False)


def test_a_ram_directory_someone_else_made_first_is_refused(tmp_path: Path) -> None:
    ram = tmp_path / "shm" / "wrenbox"
    ram.mkdir(parents=True, mode=0o777)
    os.chown(ram, NOBODY, NOBODY)
    with pytest.raises(PermissionDenied, match="belongs to uid 65534"):
        SandboxFiles(tmp_path / "sandboxes", ram)


def test_a_ram_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    (tmp_path / "wrenbox").symlink_to(target)
    with pytest.raises(PermissionDenied, match="symlink"):
        private_dir(tmp_path / "wrenbox")


def test_our_own_ram_directory_is_made_private(tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    ram.mkdir(mode=0o755)
    assert private_dir(ram) == ram
    assert ram.stat().st_mode & 0o777 == 0o700
    assert private_dir(tmp_path / "new").stat().st_mode & 0o777 == 0o700


def test_a_link_planted_where_the_ram_file_goes_is_not_followed(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"root's file")
    ram = tmp_path / "sandbox.ram"
    ram.symlink_to(secret)
    spec = JailSpec(ME, root=tmp_path / "root", files={20: ram})
    (tmp_path / "root").mkdir()
    done = _jailed(spec, "/bin/true")
    assert done.returncode == 126
    assert "Too many levels of symbolic links" in done.stderr


def test_the_jail_holds_only_what_it_was_given(tmp_path: Path) -> None:
    own = tmp_path / "run"
    own.mkdir()
    os.chown(own, ME.uid, ME.gid)
    (tmp_path / "root").mkdir()
    (tmp_path / "other").mkdir()
    spec = JailSpec(ME, root=tmp_path / "root", write=[own])
    script = (
        f"id -u; id -G; ls /; ls /dev; test -e {tmp_path}/other && echo other-visible; "
        f"touch {own}/mine && echo wrote; touch /usr/x 2>/dev/null || echo usr-read-only; "
        "cat /proc/self/status | grep -E '^(NoNewPrivs|CapEff)'; env"
    )
    done = _jailed(spec, "/bin/sh", "-c", script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [str(ME.uid), str(ME.gid)]
    assert "other-visible" not in lines
    assert {"wrote", "usr-read-only", "NoNewPrivs:\t1", "CapEff:\t0000000000000000"} <= set(lines)
    assert "PATH=/usr/bin:/bin" in lines
    assert not [line for line in lines if line.startswith(("HOME=", "WRENBOX", "PYTHON"))]
    assert (own / "mine").stat().st_uid == ME.uid
