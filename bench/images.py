"""Image builder benchmark: cache hit, agent-layer rebuild, (cold build), image sizes.

Prints one JSON line per figure: ``{"figure": NAME, "value": NUMBER, "unit": UNIT}``.

Time figures are medians of 2 (``--quick``) or 4 rounds, each round a rebuild and its baselines in turn.

- ``image_cache_hit_s``: ``build_image`` when nothing changed (resolve inputs, compare keys); baseline
  ``image_inputs_hash_s``: SHA-256 of the agent source tree, which any lookup must at least read;
  ``image_cache_hit_ratio``.
- ``image_agent_rebuild_s``: ``build_image`` after one agent source file changed (copy of the base tree,
  agent + dependencies, compileall, mkfs, hashes); baseline ``image_base_copy_s``: a plain ``cp -a`` of
  the same cached base tree, the floor of any rebuild that stages a tree; ``image_agent_rebuild_ratio``.
- without ``--quick`` also ``image_cold_build_s`` and ``image_debootstrap_s``: one build (a single sample:
  it takes minutes) with an empty layer cache (downloads the kernel and runs debootstrap against the
  Debian mirror).
- sizes: ``image_rootfs_bytes``, ``image_rootfs_allocated_bytes``, ``image_initramfs_bytes``,
  ``image_kernel_bytes``.

Needs root (debootstrap, chroot). Uses ``WRENBOX_TEST_DATA_DIR`` (default ``/var/tmp/wrenbox-test``) as the
layer cache so it shares the tests' cached layers. Usage: ``python bench/images.py [--quick]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import wrenbox
from wrenbox.config import Settings
from wrenbox.images import ImageConfig, build_image
from wrenbox.service import image_config

DATA_DIR = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 4), "unit": unit}), flush=True)


def frozen_agent(root: Path, marker: str) -> Path:
    """A private copy of the wrenbox package (the checkout may change while we measure)."""
    copy = root / marker / "wrenbox"
    shutil.copytree(Path(wrenbox.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    main = copy / "guest" / "__main__.py"
    main.write_text(main.read_text() + f"\n# {marker}\n")
    return copy


def tree_digest(tree: Path) -> str:
    """SHA-256 over every file of ``tree`` (names and bytes): what any cache lookup must at least read."""
    digest = hashlib.sha256()
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(tree)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the cold build (no debootstrap)")
    args = parser.parse_args()
    shared = image_config(Settings(data_dir=DATA_DIR))
    with tempfile.TemporaryDirectory(prefix="wrenbox-bench-images-") as tmp:
        root = Path(tmp)
        config = ImageConfig(images_dir=root / "images", cache_dir=shared.cache_dir)
        first = build_image(dataclasses.replace(config, agent_source=frozen_agent(root, "a")))
        base = shared.cache_dir / "base" / first.image.manifest.layers["base"] / "tree"
        rebuilds, hits, hashes, copies = [], [], [], []
        for i in range(2 if args.quick else 4):  # interleaved: each rebuild and its baselines in turn
            agent = frozen_agent(root, f"b{i}")
            rebuild_config = dataclasses.replace(config, agent_source=agent)
            rebuilt, rebuild_s = timed(lambda c=rebuild_config: build_image(c))
            assert not rebuilt.cached
            hit, hit_s = timed(lambda c=rebuild_config: build_image(c))
            assert hit.cached
            _, hash_s = timed(lambda a=agent: tree_digest(a))
            target = root / f"copy{i}"
            _, copy_s = timed(lambda t=target: subprocess.run(["cp", "-a", str(base), str(t)], check=True))
            shutil.rmtree(target)
            for samples, value in ((rebuilds, rebuild_s), (hits, hit_s), (hashes, hash_s), (copies, copy_s)):
                samples.append(value)
        rebuild_s, hit_s = statistics.median(rebuilds), statistics.median(hits)
        hash_s, copy_s = statistics.median(hashes), statistics.median(copies)
        emit("image_cache_hit_s", hit_s, "s")
        emit("image_inputs_hash_s", hash_s, "s")
        emit("image_cache_hit_ratio", hit_s / hash_s, "ratio")
        emit("image_agent_rebuild_s", rebuild_s, "s")
        emit("image_base_copy_s", copy_s, "s")
        emit("image_agent_rebuild_ratio", rebuild_s / copy_s, "ratio")
        if not args.quick:
            cold = ImageConfig(images_dir=root / "cold", cache_dir=root / "cold-cache")
            built, cold_s = timed(lambda: build_image(cold))
            emit("image_cold_build_s", cold_s, "s")
            emit("image_debootstrap_s", built.timings["debootstrap"], "s")
        files = rebuilt.image.manifest.files
        emit("image_rootfs_bytes", files["rootfs"].size, "B")
        emit("image_rootfs_allocated_bytes", files["rootfs"].allocated, "B")
        emit("image_initramfs_bytes", files["initramfs"].size, "B")
        emit("image_kernel_bytes", files["kernel"].size, "B")


if __name__ == "__main__":
    main()
