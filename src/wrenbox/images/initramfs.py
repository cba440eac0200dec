"""The initramfs: static busybox, the kernel modules the root disk needs, and ``/init``.

Modules are resolved from the kernel's ``modules.dep`` (dependencies first) and skipped when the kernel
has them built in (``modules.builtin``). The cpio archive is written here rather than by ``cpio`` so it
is byte-for-byte reproducible (fixed owners and times) and can carry ``/dev/console`` without mknod.
"""

from __future__ import annotations

import gzip
import io
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wrenbox.errors import NotFound

__all__ = ["CpioEntry", "build_initramfs", "is_static_executable", "resolve_modules", "write_cpio"]

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")
_APPLETS = ("sh", "mount", "umount", "insmod", "mkdir", "sleep", "cat", "echo", "switch_root")


@dataclass(frozen=True, slots=True)
class CpioEntry:
    name: str  # path inside the archive, no leading slash
    mode: int  # full st_mode (type bits included)
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def resolve_modules(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the modules to load for ``wanted``, dependencies first, built-ins left out."""
    deps: dict[str, list[str]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_module_name(path): path for path in deps}
    builtin_file = modules_dir / "modules.builtin"
    builtin = {_module_name(p) for p in builtin_file.read_text().split()} if builtin_file.exists() else set()

    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in deps.get(path, []):
            visit(dep)
        order.append(path)

    for name in wanted:
        key = name.replace("-", "_")
        if key in by_name:
            visit(by_name[key])
        elif key not in builtin:
            raise NotFound(
                f"kernel {modules_dir.name} has no module {name!r} (neither loadable nor built in)"
            )
    return order


def build_initramfs(
    dest: Path, *, busybox: Path, modules_dir: Path, modules: Sequence[str], init_script: bytes
) -> None:
    """Write the gzip'd initramfs to ``dest``. ``modules`` are paths relative to ``modules_dir``."""
    entries = [CpioEntry(d, stat.S_IFDIR | 0o755) for d in ("bin", "dev", "proc", "sys", "newroot", "lib")]
    entries.append(CpioEntry("lib/modules", stat.S_IFDIR | 0o755))
    entries.append(CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(CpioEntry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries += [CpioEntry(f"bin/{a}", stat.S_IFLNK | 0o777, b"busybox") for a in _APPLETS]
    load_order = []
    for rel in modules:
        base = rel.rsplit("/", 1)[-1]
        entries.append(
            CpioEntry(f"lib/modules/{base}", stat.S_IFREG | 0o644, (modules_dir / rel).read_bytes())
        )
        load_order.append(base)
    entries.append(
        CpioEntry(
            "lib/modules/load.order", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in load_order).encode()
        )
    )
    entries.append(CpioEntry("init", stat.S_IFREG | 0o755, init_script))
    raw = io.BytesIO()
    write_cpio(raw, entries)
    dest.write_bytes(gzip.compress(raw.getvalue(), compresslevel=9, mtime=0))


def write_cpio(out: io.BytesIO, entries: Iterable[CpioEntry]) -> None:
    """The "newc" cpio format the kernel unpacks: 110-byte ASCII header, name and data 4-byte aligned."""
    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.write(b"\0" * (-(110 + len(name)) % 4))
        out.write(entry.data)
        out.write(b"\0" * (-len(entry.data) % 4))


def is_static_executable(path: Path) -> bool:
    """True for a 64-bit ELF without a program interpreter (PT_INTERP): it runs without any libc."""
    head = path.read_bytes()
    if head[:5] != b"\x7fELF\x02":
        return False
    (phoff,) = struct.unpack_from("<Q", head, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    return all(struct.unpack_from("<I", head, phoff + i * phentsize)[0] != 3 for i in range(phnum))
