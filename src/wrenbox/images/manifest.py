"""``manifest.json`` of a built image: what it is made of, and the hashes to check it by."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = ["FileInfo", "KernelInfo", "Manifest", "file_info"]

MANIFEST = "manifest.json"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileInfo(_Model):
    name: str  # file name inside the image directory
    sha256: str
    size: int  # apparent size in bytes
    allocated: int  # bytes on disk (sparse files use less)


class KernelInfo(_Model):
    metapackage: str  # what was asked for: linux-image-cloud-amd64
    package: str  # what it resolved to: linux-image-6.1.0-56-cloud-amd64
    version: str  # 6.1.192-2
    release: str  # uname -r in the guest: 6.1.0-56-cloud-amd64
    deb_sha256: str


class Manifest(_Model):
    format: int = 1
    name: str
    build_key: str  # hash of every input; equal keys mean equal images
    created_at: datetime
    kernel: KernelInfo
    files: dict[str, FileInfo]  # role (kernel, initramfs, rootfs) → file
    modules: list[str]  # loaded by the initramfs, in this order
    layers: dict[str, str]  # layer → cache key
    suite: str
    packages: list[str]  # Debian packages asked for on top of minbase
    guest_python: dict[str, str]  # distribution → version installed for the agent
    kernel_args: list[str]  # what the image needs on the kernel command line
    agent_port: int
    timings: dict[str, float]  # seconds per build step (0 when it came from the cache)


def file_info(path: Path) -> FileInfo:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    st = path.stat()
    return FileInfo(name=path.name, sha256=h.hexdigest(), size=st.st_size, allocated=st.st_blocks * 512)
