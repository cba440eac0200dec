"""Copy-on-write root disks: time to create a disk and to flatten one, per backend.

Prints JSON lines ``{"figure", "value", "unit"}``. The baseline, measured in the same run on the same
files, is ``cp --sparse=always --reflink=never`` of the base image (what a naive implementation does per
sandbox); ``*_ratio`` figures are backend time / baseline time.

All backends run on one xfs (reflink=1) loop filesystem when run as root, else in ``--dir`` (reflink is
skipped where it cannot work). dmsnapshot runs only where the kernel has device-mapper. Page cache warm.

    python bench/rootfs.py [--quick] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from wrenbox.rootfs import BaseImage, Disk, DiskFormat, Fingerprints, RootfsConfig, backend_for
from wrenbox.rootfs.dmsnapshot import device_mapper_available
from wrenbox.rootfs.reflink import supports_reflink

MiB = 1 << 20


def emit(figure: str, value: float, unit: str) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 3), "unit": unit}), flush=True)


def make_base(path: Path, size: int) -> None:
    """Like a real ext4 image: runs of data (60 %) separated by holes."""
    rng = random.Random(0)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, 5 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(3 * MiB))
        os.fsync(f.fileno())


@contextlib.contextmanager
def xfs_loop(workdir: Path) -> Iterator[Path]:
    image, mnt = workdir / "xfs.img", workdir / "mnt"
    with contextlib.ExitStack() as stack:
        stack.callback(image.unlink, missing_ok=True)
        with open(image, "wb") as f:
            f.truncate(8 << 30)
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
        dev = subprocess.run(
            ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
        ).stdout.strip()
        stack.callback(subprocess.run, ["losetup", "--detach", dev], check=True)
        mnt.mkdir()
        stack.callback(mnt.rmdir)
        subprocess.run(["mount", dev, str(mnt)], check=True)
        stack.callback(subprocess.run, ["umount", str(mnt)], check=True)
        yield mnt


def cp(base: Path, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", "--reflink=never", str(base), str(dest)], check=True)
    return time.perf_counter() - started


async def bench_backend(name: str, root: Path, base: BaseImage, reps: int, flatten_reps: int) -> dict:
    """Median create and flatten times of one backend, and of the baseline interleaved with them.

    The baseline copies are kept as long as the disks, so both leave the same dirty data behind.
    """
    backend = backend_for(name, RootfsConfig(disks_dir=root / f"disks-{name}"))
    size = base.size + (1 << 30)  # sandbox disks are larger than their base
    copies = root / f"cp-{name}"
    copies.mkdir()
    disks, create_s, flatten_s, cp_s = [], [], [], []
    for i in range(reps):
        cp_s.append(cp(base.path, copies / str(i)))
        started = time.perf_counter()
        disks.append(await backend.create(base, f"c{i}", size=size))
        create_s.append(time.perf_counter() - started)
    disk = disks[0]
    write_16mib(disk)
    await backend.persist(disk)
    for i in range(flatten_reps):
        cp_s.append(cp(base.path, copies / f"f{i}"))
        dest = root / f"template-{name}-{i}.ext4"
        started = time.perf_counter()
        await backend.flatten(disk, dest)
        flatten_s.append(time.perf_counter() - started)
        dest.unlink()
    for each in disks:
        await backend.remove(each)
    for each in copies.iterdir():
        each.unlink()
    return {
        "create": statistics.median(create_s),
        "flatten": statistics.median(flatten_s),
        "baseline": statistics.median(cp_s),
    }


def write_16mib(disk: Disk) -> None:
    """What a guest might have changed before its sandbox becomes a template."""
    if disk.format is DiskFormat.QCOW2:
        command = f"write -P 0x5a {MiB} {16 * MiB}"
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", command, str(disk.path)], check=True, capture_output=True
        )
    else:
        with open(disk.path, "r+b") as f:
            f.seek(MiB)
            f.write(os.urandom(16 * MiB))


async def run(root: Path, quick: bool) -> None:
    size = (64 if quick else 200) * MiB
    reps, flatten_reps = (3, 1) if quick else (10, 3)
    base_path = root / "base.ext4"
    make_base(base_path, size)
    backends = ["qcow2", "copy"]
    if supports_reflink(root):
        backends.insert(1, "reflink")
    else:
        print(f"reflink: skipped, {root} cannot make reflink clones", file=sys.stderr)
    if device_mapper_available() and os.geteuid() == 0:
        backends.append("dmsnapshot")
    else:
        print("dmsnapshot: skipped, kernel has no device-mapper", file=sys.stderr)

    fingerprints = Fingerprints()
    started = time.perf_counter()
    base = await fingerprints.of(base_path)  # once per image; templates record it
    fingerprint_s = time.perf_counter() - started
    emit("rootfs_base_mib", size / MiB, "MiB")
    emit("rootfs_fingerprint_ms", fingerprint_s * 1000, "ms")
    for name in backends:
        result = await bench_backend(name, root, base, reps, flatten_reps)
        baseline = result["baseline"]
        emit(f"rootfs_baseline_cp_{name}_ms", baseline * 1000, "ms")
        emit(f"rootfs_create_{name}_ms", result["create"] * 1000, "ms")
        emit(f"rootfs_create_{name}_ratio", result["create"] / baseline, "ratio")
        emit(f"rootfs_flatten_{name}_ms", result["flatten"] * 1000, "ms")
        emit(f"rootfs_flatten_{name}_ratio", result["flatten"] / baseline, "ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small base image, few repetitions")
    parser.add_argument("--dir", type=Path, help="run here instead of on an xfs loop filesystem")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        if args.dir is not None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir)))
        elif os.geteuid() == 0:
            root = stack.enter_context(xfs_loop(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        asyncio.run(run(root, args.quick))


if __name__ == "__main__":
    main()
