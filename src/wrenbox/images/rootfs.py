"""The root filesystem, in two layers.

The base layer is ``debootstrap --variant=minbase`` plus the configured packages, trimmed, with the
sandbox user ``user`` (uid 1000, passwordless sudo). It takes about a minute and is cached by its recipe.
The top layer is cheap (seconds): a copy of the base with busybox init, the rc script, the guest agent
and its Python dependencies (precompiled), turned into an ext4 image by ``mkfs.ext4 -d`` (no mount).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from wrenbox.command import run
from wrenbox.errors import CorruptData
from wrenbox.images.agent import GuestPackages
from wrenbox.images.cache import LayerCache, unmount_under

__all__ = ["BaseRecipe", "build_base", "build_rootfs", "guest_file", "make_ext4", "tree_bytes"]

USER, UID, HOME = "user", 1000, "/home/user"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on Debian python3's sys.path
_TRIM = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/log",
)


@dataclass(frozen=True, slots=True)
class BaseRecipe:
    suite: str
    mirror: str
    packages: tuple[str, ...]
    # Bump when the code that builds the base changes in a way the fields above do not capture.
    revision: int = 1


def guest_file(name: str) -> bytes:
    """A file shipped under ``wrenbox/images/guest/`` (init script, rc, inittab, sudoers)."""
    return resources.files("wrenbox.images").joinpath("guest", name).read_bytes()


def build_base(cache: LayerCache, key: str, recipe: BaseRecipe) -> tuple[Path, bool]:
    """The base tree for ``recipe`` (cached under ``key``). Returns (tree, was_cached)."""
    cached = cache.get("base", key)
    if cached is not None:
        return cached / "tree", True
    debs = cache.root / "debs"  # debootstrap's download cache survives recipe changes
    debs.mkdir(parents=True, exist_ok=True)
    with cache.building("base", key) as tmp:
        tree = tmp / "tree"
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(recipe.packages)}",
            f"--cache-dir={debs}",
            recipe.suite,
            str(tree),
            recipe.mirror,
        ]
        try:
            run(argv, timeout=1800)
        finally:
            unmount_under(tree)  # a failed debootstrap can leave /proc mounted in the chroot
        _trim(tree)
        _add_user(tree)
    return cache.root / "base" / key / "tree", False


def _trim(tree: Path) -> None:
    for rel in _TRIM:
        for child in (tree / rel).glob("*"):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    for doc in (tree / "usr/share/doc").glob("*/*"):
        if doc.name != "copyright":  # keep the licences
            shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()


def _add_user(tree: Path) -> None:
    etc = tree / "etc"
    passwd = (etc / "passwd").read_text()
    if f"\n{USER}:" in f"\n{passwd}":
        return
    _append(etc / "passwd", f"{USER}:x:{UID}:{UID}::{HOME}:/bin/bash\n")
    _append(etc / "shadow", f"{USER}:*::0:99999:7:::\n")
    _append(etc / "group", f"{USER}:x:{UID}:\n")
    _append(etc / "gshadow", f"{USER}:!::\n")
    sudoers = etc / "sudoers.d" / USER
    sudoers.write_bytes(guest_file("sudoers"))
    sudoers.chmod(0o440)
    home = tree / HOME.lstrip("/")
    shutil.copytree(etc / "skel", home, dirs_exist_ok=True)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, UID, UID)
    home.chmod(0o750)


def _append(path: Path, line: str) -> None:
    with open(path, "a") as f:
        f.write(line)


def build_rootfs(
    base: Path,
    dest: Path,
    *,
    stage: Path,
    busybox: Path,
    packages: GuestPackages,
    headroom_mib: int,
) -> None:
    """Stage base + guest files + agent under ``stage`` (must not exist) and write ``dest`` (ext4)."""
    run(["cp", "-a", "--reflink=auto", str(base), str(stage)], timeout=600)
    if not (stage / "usr/lib/python3.11").is_dir():
        raise CorruptData(f"base tree {base} has no Python 3.11; the guest agent needs the host's Python")
    _install(stage / "usr/local/bin/busybox", busybox.read_bytes(), 0o755)
    init = stage / "sbin/init"
    if init.exists() or init.is_symlink():
        init.unlink()
    init.symlink_to("/usr/local/bin/busybox")  # busybox init is PID 1: reaps orphans, respawns the agent
    _install(stage / "etc/wrenbox/rc", guest_file("rc.sh"), 0o755)
    _install(stage / "etc/inittab", guest_file("inittab"), 0o644)
    _install(stage / "etc/hostname", b"sandbox\n", 0o644)
    packages.install(stage / SITE_PACKAGES)
    # Compile with the guest's own interpreter so the bytecode matches it exactly.
    run(
        ["chroot", str(stage), "/usr/bin/python3", "-m", "compileall", "-q", f"/{SITE_PACKAGES}"], timeout=600
    )
    make_ext4(stage, dest, headroom_mib=headroom_mib)


def _install(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def tree_bytes(tree: Path) -> int:
    """Space the tree takes (allocated blocks, hard links once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in dirnames + filenames:
            st = os.lstat(f"{dirpath}/{name}")
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def make_ext4(tree: Path, dest: Path, *, headroom_mib: int, extra: Sequence[str] = ()) -> None:
    """``mkfs.ext4 -d``: an image of ``tree`` with ``headroom_mib`` free (the guest grows it further)."""
    size_mib = tree_bytes(tree) * 12 // 10 // 2**20 + headroom_mib
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "wrenbox-root",
        "-b",
        "4096",
        "-m",
        "1",
        "-i",
        "8192",
        "-E",
        "root_owner=0:0",
    ]
    run([*argv, *extra, "-d", str(tree), str(dest), f"{size_mib}M"], timeout=600)
