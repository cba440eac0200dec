"""What the guest agent needs inside the image: the ``wrenbox`` package and its runtime dependencies.

``GUEST_REQUIREMENTS`` is the one list of what the agent needs besides ``wrenbox``. Their transitive
dependencies are resolved from the metadata of the distributions installed on the host, and the installed
files are copied as they are: the guest runs Debian bookworm's Python 3.11, the host's version, so the
host's wheels (including compiled extensions) work there unchanged and no index is contacted.
``wrenbox`` itself is copied without its own dependencies (``--no-deps``): the agent imports nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

import wrenbox
from wrenbox.errors import Unsupported

__all__ = ["GUEST_REQUIREMENTS", "GuestPackages", "guest_packages"]

GUEST_REQUIREMENTS: tuple[str, ...] = ("connectrpc", "protobuf-py", "hypercorn")

_SKIP_PARTS = {"__pycache__"}


@dataclass(frozen=True, slots=True)
class GuestPackages:
    """The distributions to install (name → version) and the files of each, relative to site-packages."""

    versions: dict[str, str]
    files: dict[str, tuple[tuple[Path, Path], ...]]  # name → ((source, relative destination), ...)

    @property
    def digest(self) -> str:
        """Changes whenever any file that would be installed changes."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(f"{name}=={self.versions[name]}\n".encode())
            for src, rel in self.files[name]:
                h.update(f"{rel}\0".encode())
                h.update(hashlib.sha256(src.read_bytes()).digest())
        return h.hexdigest()

    def install(self, site_packages: Path) -> int:
        """Copy every file under ``site_packages``; returns how many were copied."""
        count = 0
        for entries in self.files.values():
            for src, rel in entries:
                dest = site_packages / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
                count += 1
        return count


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dependencies(dist: metadata.Distribution) -> list[str]:
    env = {**default_environment(), "extra": ""}  # the guest's interpreter matches the host's
    names = []
    for spec in dist.requires or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate(env):
            names.append(req.name)
    return names


def _installed_files(dist: metadata.Distribution) -> tuple[tuple[Path, Path], ...]:
    site = Path(str(dist.locate_file(""))).resolve()
    out = []
    for entry in dist.files or []:
        src = Path(str(dist.locate_file(entry))).resolve()
        if not src.is_relative_to(site) or _SKIP_PARTS & set(entry.parts) or not src.is_file():
            continue  # console scripts land in bin/; caches are regenerated in the guest
        out.append((src, src.relative_to(site)))
    return tuple(sorted(out, key=lambda pair: str(pair[1])))


def _wrenbox_files(package: Path) -> tuple[tuple[Path, Path], ...]:
    out = []
    for src in sorted(package.rglob("*")):
        rel = Path("wrenbox") / src.relative_to(package)
        if src.is_file() and not (_SKIP_PARTS & set(rel.parts)) and src.suffix != ".pyc":
            out.append((src, rel))
    return tuple(out)


def guest_packages(
    requirements: tuple[str, ...] = GUEST_REQUIREMENTS, *, wrenbox_dir: Path | None = None
) -> GuestPackages:
    """Resolve ``requirements`` and their dependencies against the host's installed distributions.

    ``wrenbox_dir`` is the ``wrenbox`` package directory to install (default: the one running now).
    """
    versions: dict[str, str] = {}
    files: dict[str, tuple[tuple[Path, Path], ...]] = {}
    pending = list(requirements)
    while pending:
        name = _normalize(pending.pop())
        if name in versions:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise Unsupported(
                f"the guest agent needs the Python distribution {name!r}, which is not installed on the host "
                "(pip install -e .)"
            ) from None
        versions[name] = dist.version
        files[name] = _installed_files(dist)
        pending.extend(_dependencies(dist))
    versions["wrenbox"] = wrenbox.__version__
    files["wrenbox"] = _wrenbox_files(wrenbox_dir or Path(wrenbox.__file__).resolve().parent)
    return GuestPackages(versions, files)
