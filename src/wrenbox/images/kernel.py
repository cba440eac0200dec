"""The guest kernel: Debian's cloud kernel, fetched as a .deb through apt and unpacked.

The metapackage (``linux-image-cloud-amd64``) names no kernel itself; it depends on exactly one
versioned package (``linux-image-6.1.0-56-cloud-amd64`` of version ``6.1.192-2``). That package and
version are what an image records, and what the unpacked tree is cached under.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from wrenbox.command import run
from wrenbox.errors import NotFound
from wrenbox.images.cache import LayerCache

__all__ = ["KernelPackage", "KernelTree", "fetch_kernel", "resolve_kernel"]

_APT_OPTIONS = ["-o", "APT::Sandbox::User=root"]  # the download dir is ours; apt's _apt user can't write it


@dataclass(frozen=True, slots=True)
class KernelPackage:
    name: str  # linux-image-6.1.0-56-cloud-amd64
    version: str  # 6.1.192-2

    @property
    def release(self) -> str:
        """``uname -r`` of this kernel, also the name of its modules directory."""
        return self.name.removeprefix("linux-image-").removesuffix("-unsigned")

    @property
    def cache_key(self) -> str:
        return re.sub(r"[^A-Za-z0-9.+-]", "_", f"{self.name}_{self.version}")


@dataclass(frozen=True, slots=True)
class KernelTree:
    """An unpacked kernel package with ``modules.dep`` generated."""

    root: Path
    package: KernelPackage
    deb_sha256: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.package.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.package.release


def _candidate_fields(package: str) -> dict[str, str]:
    out = run(["apt-cache", "show", "--no-all-versions", package], check=False, timeout=60)
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", out.text, flags=re.MULTILINE))
    if out.returncode != 0 or "Version" not in fields:
        raise NotFound(
            f"apt knows no package {package!r}; run 'apt-get update' (Debian main must be enabled)"
        )
    return fields


def resolve_kernel(metapackage: str) -> KernelPackage:
    """The versioned kernel package that apt's candidate of ``metapackage`` depends on."""
    fields = _candidate_fields(metapackage)
    if re.fullmatch(r"linux-image-\d.*", metapackage):
        return KernelPackage(metapackage, fields["Version"])  # already a versioned kernel package
    match = re.search(r"(linux-image-\d[^\s,(]*)\s*\(=\s*([^)\s]+)\)", fields.get("Depends", ""))
    if match is None:
        raise NotFound(f"{metapackage!r} does not depend on a versioned linux-image package")
    return KernelPackage(match.group(1), match.group(2))


def fetch_kernel(cache: LayerCache, package: KernelPackage) -> tuple[KernelTree, bool]:
    """The unpacked kernel tree, from the cache or downloaded now. Returns (tree, was_cached)."""
    cached = cache.get("kernel", package.cache_key)
    if cached is not None:
        return _tree(cached, package), True
    with cache.building("kernel", package.cache_key) as tmp:
        download = tmp / "download"
        download.mkdir()
        run(
            ["apt-get", *_APT_OPTIONS, "download", f"{package.name}={package.version}"],
            cwd=download,
            timeout=600,
        )
        (deb,) = download.glob("*.deb")
        digest = hashlib.sha256(deb.read_bytes()).hexdigest()
        run(["dpkg-deb", "-x", str(deb), str(tmp / "tree")], timeout=300)
        # The .deb ships no modules.dep (its postinst generates it); make it for the module resolver.
        run(["depmod", "-b", str(tmp / "tree"), package.release], timeout=300)
        (tmp / "deb.sha256").write_text(digest + "\n")
        deb.unlink()
        download.rmdir()
    return _tree(cache.root / "kernel" / package.cache_key, package), False


def _tree(layer: Path, package: KernelPackage) -> KernelTree:
    tree = KernelTree(layer / "tree", package, (layer / "deb.sha256").read_text().strip())
    if not tree.vmlinuz.is_file():
        raise NotFound(f"{package.name} {package.version} contains no {tree.vmlinuz.name}")
    return tree
