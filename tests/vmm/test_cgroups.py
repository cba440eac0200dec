"""Per-sandbox cgroups on this host's real kernel (cgroup v1 here, with an almost empty cgroup2 mount at
/sys/fs/cgroup/unified), plus the v2 limit files against a fake tree where a real one cannot exist.

Every group is made under ``wrenbox-test-<pid>`` (not the product's ``wrenbox``) and removed after the
test; every process is ended by its PID.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wrenbox.errors import InUse, InvalidArgument, NotFound, Unavailable, Unsupported
from wrenbox.pids import ProcessRef
from wrenbox.vmm.cgroups import (
    Cgroup,
    CgroupConfig,
    CgroupLimits,
    CgroupTree,
    Hierarchy,
    IoLimit,
    find_hierarchy,
    whole_disk_of,
)

pytestmark = pytest.mark.root

MIB = 1024 * 1024
GROUP = f"wrenbox-test-{os.getpid()}"
UNIFIED = Path("/sys/fs/cgroup/unified")
# The launcher's whole job, as the VMM launcher does it: join every hierarchy, then exec.
JOIN = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 111; shift; done; shift; exec "$@"'


def joined(cg: Cgroup, *argv: str) -> list[str]:
    return ["sh", "-c", JOIN, "sh", *map(str, cg.procs_files), "--", *argv]


def small(memory_mib: int = 64, pids: int = 64) -> CgroupLimits:
    return CgroupLimits(cpu_quota_us=100_000, memory_bytes=memory_mib * MIB, pids_max=pids)


def own_paths() -> dict[str, str]:
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            own[c] = path
    return own


def wait_exec(pid: int, comm: str) -> None:
    """Wait until the launcher has exec'd ``comm`` (so it has joined)."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/comm").read_text().strip() != comm:
        assert time.monotonic() < deadline, f"{pid} never became {comm}"
        time.sleep(0.01)


def end(pids: list[int]) -> None:
    for pid in pids:
        try:
            ProcessRef.of(pid).terminate(grace=1.0)
        except ProcessLookupError:
            continue


def dispose(tree: CgroupTree) -> None:
    for name in tree.names():
        cg = tree.get(name)
        end(cg.pids())
        cg.remove()
    for d in tree.dirs:
        d.rmdir()


@pytest.fixture
def tree() -> Iterator[CgroupTree]:
    try:
        tree = CgroupTree.discover(GROUP)
    except Unsupported as exc:
        pytest.skip(str(exc))
    yield tree
    dispose(tree)


@pytest.fixture
def shm() -> Iterator[Path]:
    """A directory on tmpfs, where guest RAM files live."""
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="wrenbox-test-") as d:
        yield Path(d)


def test_discover_puts_our_groups_under_the_cgroup_we_are_in(tree: CgroupTree) -> None:
    """This host is v1: one directory per hierarchy, each a child of *our* cgroup of that hierarchy
    (memory is /process_api/<id> here: limits put on us stay above every sandbox)."""
    own = own_paths()
    assert tree.version == 1
    assert set(tree.controllers) >= {"cpu", "memory", "pids"}
    for controller, d in tree.controllers.items():
        assert d == Path(f"/sys/fs/cgroup/{controller}{own[controller].rstrip('/')}/{GROUP}")
        assert d.is_dir()
    assert tree.controllers["memory"].parent != Path("/sys/fs/cgroup/memory")
    assert find_hierarchy() == Hierarchy(1, {c: d.parent for c, d in tree.controllers.items()})


def test_find_reads_a_containers_view(tmp_path: Path) -> None:
    """FAKE /proc files (a container's view cannot be made here): the cgroup2 mount shows only the
    container's subtree (mount root /docker/abc), at a mount point with a space in it."""
    point = tmp_path / "cg root"
    own = point / "sub"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu io memory pids\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    escaped = str(point).replace(" ", "\\040")
    (proc / "mountinfo").write_text(
        "25 1 0:22 / /sys rw - sysfs sysfs rw\n"
        f"30 25 0:26 /docker/abc {escaped} rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (proc / "cgroup").write_text("0::/docker/abc/sub\n")
    assert find_hierarchy(proc=proc) == Hierarchy(2, dict.fromkeys(("cpu", "memory", "pids", "io"), own))
    (proc / "cgroup").write_text("0::/elsewhere\n")
    with pytest.raises(Unsupported, match=r"not mounted here.*v1 lacks cpu, memory, pids"):
        find_hierarchy(proc=proc)


def test_create_writes_the_sandbox_limits(tree: CgroupTree, tmp_path: Path) -> None:
    config = CgroupConfig(memory_overhead_mib=32, pids_max=100, io_read_bps=8 * MIB, io_write_bps=4 * MIB)
    disk = whole_disk_of(tmp_path)
    assert disk is not None
    limits = CgroupLimits.for_sandbox(vcpus=2, memory_mib=96, config=config, io_device=disk)
    # Two vCPUs and one CPU for QEMU's own threads.
    assert limits == CgroupLimits(300_000, 128 * MIB, 100, io=IoLimit(disk, 8 * MIB, 4 * MIB))

    cg = tree.create("sbx1", limits)

    def read(controller: str, name: str) -> str:
        return (cg.controllers[controller] / name).read_text().strip()

    assert read("cpu", "cpu.cfs_quota_us") == "300000"
    assert read("cpu", "cpu.cfs_period_us") == "100000"
    assert read("cpu", "cpu.cfs_burst_us") == "300000"
    assert read("memory", "memory.limit_in_bytes") == str(128 * MIB)
    assert read("pids", "pids.max") == "100"
    assert read("blkio", "blkio.throttle.read_bps_device") == f"{disk} {8 * MIB}"
    assert read("blkio", "blkio.throttle.write_bps_device") == f"{disk} {4 * MIB}"
    assert tree.names() == ["sbx1"]


def test_create_again_reuses_the_group_and_reapplies_limits(tree: CgroupTree) -> None:
    first = tree.create("sbx1", small(memory_mib=64, pids=32))
    again = tree.create("sbx1", small(memory_mib=80, pids=48))
    assert again == first == tree.get("sbx1")
    assert (again.controllers["memory"] / "memory.limit_in_bytes").read_text().strip() == str(80 * MIB)
    assert (again.controllers["pids"] / "pids.max").read_text().strip() == "48"


def test_bad_names_and_limits_are_refused_before_anything_is_made(tree: CgroupTree) -> None:
    for bad in ("../escape", "", "a/b", ".hidden"):
        with pytest.raises(InvalidArgument):
            tree.create(bad, small())
    with pytest.raises(InvalidArgument, match="memory"):
        CgroupLimits(cpu_quota_us=100_000, memory_bytes=1024, pids_max=8)
    with pytest.raises(InvalidArgument, match="memory_overhead_mib"):
        CgroupConfig(memory_overhead_mib=0)
    assert tree.names() == []


def test_a_group_that_cannot_take_its_limits_is_not_left_behind(tree: CgroupTree) -> None:
    """The kernel refuses a CPU quota above the parent's: a clear error, and no half-made group."""
    (tree.controllers["cpu"] / "cpu.cfs_quota_us").write_text("100000")
    with pytest.raises(Unavailable, match=r"cpu\.cfs_quota_us"):
        tree.create("sbx1", CgroupLimits(cpu_quota_us=200_000, memory_bytes=64 * MIB, pids_max=64))
    assert tree.names() == []


def test_a_process_joins_by_writing_zero_and_remove_waits_for_it(tree: CgroupTree, tmp_path: Path) -> None:
    cg = tree.create("sbx1", small())
    proc = subprocess.Popen(joined(cg, "sleep", "30"))
    try:
        wait_exec(proc.pid, "sleep")
        assert cg.pids() == [proc.pid]
        assert tree.holding(proc.pid) == cg
        assert tree.holding(os.getpid()) is None
        lines = Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
        for controller in ("cpu", "memory", "pids", "blkio"):
            assert any(f"{controller}:" in line and line.endswith(f"/{GROUP}/sbx1") for line in lines)
        assert 0 < cg.memory_bytes() < 64 * MIB

        with pytest.raises(InUse, match=str(proc.pid)):
            cg.remove(timeout=0.1)
        assert all(d.is_dir() for d in cg.dirs)  # refused: nothing removed, nothing killed
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    cg.remove()
    assert not any(d.exists() for d in cg.dirs)
    assert tree.names() == []
    cg.remove()  # removing what is gone is fine
    with pytest.raises(NotFound):
        tree.get("sbx1")


def test_a_memory_hog_is_killed_at_the_limit(tree: CgroupTree) -> None:
    """The attack: a VMM growing without bound (here: python allocating 512 MiB). Without the group it
    runs to the end and prints its total; in it, the kernel kills it at memory.max."""
    cg = tree.create("hog", small(memory_mib=48))
    hog = "c = []\nfor i in range(512):\n    c.append(b'x' * (1 << 20))\nprint('allocated', i + 1)\n"
    done = subprocess.run(joined(cg, sys.executable, "-c", hog), capture_output=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done
    assert b"allocated" not in done.stdout
    assert cg.oom_kills() >= 1
    assert cg.memory_limit_bytes() == 48 * MIB
    peak = cg.memory_peak_bytes()
    assert peak is None or 40 * MIB < peak <= 48 * MIB  # it got to the limit, and not past it


def test_a_fork_bomb_stops_at_pids_max(tree: CgroupTree) -> None:
    """The attack: a process forking without bound (bounded here: at most 64 children, each killed by
    PID before the script exits). In a group with pids.max 8 the 8th process cannot be made."""
    cg = tree.create("bomb", small(pids=8))
    bomb = (
        "import os, signal, time\n"
        "kids = []\n"
        "try:\n"
        "    for _ in range(64):\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        kids.append(pid)\n"
        "    print('forked', len(kids))\n"
        "except BlockingIOError:\n"
        "    print('refused after', len(kids))\n"
        "finally:\n"
        "    for pid in kids:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "        os.waitpid(pid, 0)\n"
    )
    done = subprocess.run(joined(cg, sys.executable, "-c", bomb), capture_output=True, timeout=60)
    assert done.stdout.decode().split() == ["refused", "after", "7"], done
    events = (cg.controllers["pids"] / "pids.events").read_text().split()
    assert int(events[events.index("max") + 1]) >= 1
    assert cg.pids() == []


def touch_pages(cg: Cgroup, ram: Path, size: int) -> subprocess.Popen[bytes]:
    """A stand-in for QEMU's guest RAM: map ``ram`` shared (memory-backend-file,share=on), write a byte
    in every page, say so and stay alive."""
    script = (
        "import mmap, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "m = mmap.mmap(fd, int(sys.argv[2]), mmap.MAP_SHARED)\n"
        "for off in range(0, len(m), mmap.PAGESIZE):\n"
        "    m[off] = 7\n"
        "print('touched', flush=True)\n"
        "time.sleep(30)\n"
    )
    argv = joined(cg, sys.executable, "-c", script, str(ram), str(size))
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


def test_restore_from_full_ram_file_is_not_charged(tree: CgroupTree, shm: Path) -> None:
    """A restore: the manager fills the RAM file before QEMU starts. tmpfs pages are charged to the
    cgroup that allocates them, so the guest using all 64 MiB of it costs its group nothing, even under a
    memory.max of half its RAM: the limit cannot OOM-kill a VM restoring from a full RAM file."""
    ram = shm / "sbx.ram"
    with ram.open("wb") as f:  # this test plays the manager
        for _ in range(64):
            f.write(b"\1" * MIB)
    cg = tree.create("restored", small(memory_mib=32))
    proc = touch_pages(cg, ram, 64 * MIB)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"touched\n"
        assert cg.memory_bytes() < 24 * MIB
        assert cg.oom_kills() == 0
    finally:
        proc.kill()
        proc.wait()


def test_first_touch_of_guest_ram_is_charged_to_the_vmm(tree: CgroupTree, shm: Path) -> None:
    """A fresh boot (or the holes of a sparse RAM file): pages the guest touches first are charged to
    the VMM's group, so memory.max must hold the whole guest RAM plus QEMU's overhead. Sized that way
    the guest uses all 64 MiB; sized below its RAM the VMM is killed."""
    ram = shm / "sbx.ram"
    ram.touch()
    os.truncate(ram, 64 * MIB)
    sized = CgroupLimits.for_sandbox(vcpus=1, memory_mib=64, config=CgroupConfig(memory_overhead_mib=32))
    fits = tree.create("fresh", sized)
    proc = touch_pages(fits, ram, 64 * MIB)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"touched\n"
        assert fits.memory_bytes() >= 64 * MIB
    finally:
        proc.kill()
        proc.wait()

    sparse = shm / "other.ram"
    sparse.touch()
    os.truncate(sparse, 64 * MIB)
    too_small = tree.create("starved", small(memory_mib=32))
    proc = touch_pages(too_small, sparse, 64 * MIB)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert too_small.oom_kills() >= 1


def test_io_throttle_slows_direct_reads(tree: CgroupTree, tmp_path: Path) -> None:
    """blkio throttling is real here (virtio disk 254:0): 3 MiB read with O_DIRECT at 1 MiB/s."""
    disk = whole_disk_of(tmp_path)
    assert disk is not None
    data = tmp_path / "data"
    data.write_bytes(os.urandom(3 * MIB))
    os.sync()
    limits = CgroupLimits(100_000, 64 * MIB, 64, io=IoLimit(disk, read_bps=MIB))
    cg = tree.create("io", limits)
    argv = joined(cg, "dd", f"if={data}", "of=/dev/null", "bs=256K", "iflag=direct", "status=none")
    started = time.monotonic()
    subprocess.run(argv, check=True, timeout=30)
    assert time.monotonic() - started > 1.5


def test_io_limit_is_skipped_where_the_device_cannot_be_throttled(tree: CgroupTree, shm: Path) -> None:
    assert whole_disk_of(shm) is None  # tmpfs: no block device
    cg = tree.create("io", CgroupLimits(100_000, 64 * MIB, 64, io=IoLimit("1:3", read_bps=MIB)))  # /dev/null
    assert (cg.controllers["memory"] / "memory.limit_in_bytes").read_text().strip() == str(64 * MIB)


def test_reclaim_removes_leftovers_but_keeps_named_and_busy_groups(tree: CgroupTree) -> None:
    for name in ("kept", "stale", "busy"):
        tree.create(name, small())
    busy = tree.get("busy")
    proc = subprocess.Popen(joined(busy, "sleep", "30"))
    try:
        wait_exec(proc.pid, "sleep")
        assert tree.names() == ["busy", "kept", "stale"]
        assert tree.reclaim(keep=["kept"]) == ["stale"]
        assert tree.names() == ["busy", "kept"]
        assert proc.poll() is None  # reclaim kills nothing
    finally:
        proc.kill()
        proc.wait()
    assert tree.reclaim(keep=[]) == ["busy", "kept"]
    assert tree.names() == []


def test_a_half_made_group_is_listed_and_reclaimed(tree: CgroupTree) -> None:
    """A crash between the hierarchies' mkdirs leaves the group in some of them only."""
    (tree.controllers["pids"] / "crashed").mkdir()
    assert tree.names() == ["crashed"]
    assert tree.reclaim(keep=[]) == ["crashed"]
    assert not (tree.controllers["pids"] / "crashed").exists()


def test_discover_without_permission_says_why() -> None:
    """An unprivileged process cannot create cgroups here: discover reports that, for each mode."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try, report
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            try:
                CgroupTree.discover(GROUP)
                message = "no error"
            except Unsupported as exc:
                message = exc.message
            os.write(write, message.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        message = f.read()
    os.waitpid(pid, 0)
    assert message.startswith("cannot confine VMMs in cgroups:")
    assert "cgroup v2" in message
    assert "not writable" in message
    assert not any(Path(f"/sys/fs/cgroup/{c}/{GROUP}").exists() for c in ("cpu", "pids"))


# --- cgroup v2 ---------------------------------------------------------------------------------------


def unified_own() -> Path:
    if not (UNIFIED / "cgroup.controllers").exists():
        pytest.skip("no cgroup2 mount at /sys/fs/cgroup/unified")
    return UNIFIED / own_paths()[""].lstrip("/")


def test_v2_create_join_remove_on_the_real_unified_mount() -> None:
    """What v2 can do here: this host's cgroup2 has none of cpu/memory/pids (they are v1's), so the
    product's discover refuses it, saying so; a tree without controllers still makes, joins and removes
    groups on the real kernel."""
    own = unified_own()
    with pytest.raises(Unsupported, match="lacks cpu, memory, pids"):
        CgroupTree.v2(own, GROUP)
    assert not (own / GROUP).exists()

    tree = CgroupTree.v2(own, GROUP, required=(), optional=())
    try:
        cg = tree.create("sbx1", small())
        assert cg.procs_files == [own / GROUP / "sbx1" / "cgroup.procs"]
        proc = subprocess.Popen(joined(cg, "sleep", "30"))
        try:
            wait_exec(proc.pid, "sleep")
            assert cg.pids() == [proc.pid]
            assert (
                f"0::{own_paths()[''].rstrip('/')}/{GROUP}/sbx1"
                in Path(f"/proc/{proc.pid}/cgroup").read_text()
            )
            with pytest.raises(InUse):
                cg.remove(timeout=0.1)
        finally:
            proc.kill()
            proc.wait()
        cg.remove()
        assert tree.names() == []
    finally:
        dispose(tree)


@pytest.fixture
def hugetlb_delegated() -> Iterator[Path]:
    """A cgroup of our own on the unified mount that, like a systemd service with Delegate=yes, holds
    a process and has a domain controller available (hugetlb: the one this host's cgroup2 has)."""
    root = UNIFIED
    if "hugetlb" not in (root / "cgroup.controllers").read_text().split():
        pytest.skip("the unified mount offers no domain controller to delegate")
    enabled_before = "hugetlb" in (root / "cgroup.subtree_control").read_text().split()
    if not enabled_before:
        (root / "cgroup.subtree_control").write_text("+hugetlb")
    own = root / f"{GROUP}-service"
    own.mkdir()
    proc = subprocess.Popen(["sh", "-c", JOIN, "sh", str(own / "cgroup.procs"), "--", "sleep", "30"])
    try:
        wait_exec(proc.pid, "sleep")
        yield own
    finally:
        proc.kill()
        proc.wait()
        for d in sorted(own.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                d.rmdir()
        own.rmdir()
        if not enabled_before:
            (root / "cgroup.subtree_control").write_text("-hugetlb")


def test_v2_moves_the_managers_processes_into_a_leaf_to_delegate(hugetlb_delegated: Path) -> None:
    """v2's "no internal processes" rule on the real kernel: a cgroup holding a process cannot enable a
    domain controller for its children; discovery moves the processes into ``<group>-manager`` first."""
    own = hugetlb_delegated
    [service_pid] = (own / "cgroup.procs").read_text().split()
    with pytest.raises(OSError, match="busy") as refused:
        (own / "cgroup.subtree_control").write_text("+hugetlb")
    assert refused.value.errno == errno.EBUSY

    tree = CgroupTree.v2(own, GROUP, required=("hugetlb",), optional=())

    leaf = own / f"{GROUP}-manager"
    assert (leaf / "cgroup.procs").read_text().split() == [service_pid]
    assert (own / "cgroup.procs").read_text() == ""
    assert "hugetlb" in (own / "cgroup.subtree_control").read_text().split()
    assert "hugetlb" in (own / GROUP / "cgroup.subtree_control").read_text().split()
    cg = tree.create("sbx1", small())
    assert any(p.name.startswith("hugetlb.") for p in cg.dirs[0].iterdir())
    # Discovering again from inside the leaf (where the manager now is) finds the same tree.
    assert CgroupTree.v2(leaf, GROUP, required=("hugetlb",), optional=()) == tree
    cg.remove()


def fake_v2(tmp_path: Path, controllers: str, procs: str) -> Path:
    """A stand-in v2 cgroup directory: plain files where cgroupfs would have them."""
    own = tmp_path / "wrenbox.service"
    own.mkdir()
    (own / "cgroup.controllers").write_text(controllers)
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text(procs)
    (own / "cgroup.type").write_text("domain\n")
    # cgroupfs fills a new directory with its files; the fake's parent is made ahead with the one read.
    (own / "wrenbox").mkdir()
    (own / "wrenbox" / "cgroup.subtree_control").write_text("")
    return own


def test_v2_limit_files_in_a_fake_tree(tmp_path: Path) -> None:
    """FAKE, because no real v2 tree with cpu, memory, pids and io can exist on this host (those
    controllers are bound to its v1 hierarchies). Checks the exact writes: the manager's processes
    into the leaf, the controllers enabled at both levels, and every limit file's value."""
    own = fake_v2(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc\n", "4242\n")
    tree = CgroupTree.v2(own, "wrenbox")
    assert (own / "wrenbox-manager" / "cgroup.procs").read_text() == "4242"
    assert (own / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"
    assert (own / "wrenbox" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids +io"

    config = CgroupConfig(io_read_bps=MIB)
    cg = tree.create(
        "sbx1", CgroupLimits.for_sandbox(vcpus=3, memory_mib=512, config=config, io_device="8:0")
    )
    files = {p.name: p.read_text() for p in cg.dirs[0].iterdir()}
    assert files == {
        "cpu.max": "400000 100000",
        "memory.max": str(768 * MIB),
        "pids.max": "256",
        "io.max": "8:0 rbps=1048576 wbps=max",
    }
    assert cg.procs_files == [own / "wrenbox" / "sbx1" / "cgroup.procs"]


def test_v2_without_the_required_controllers_is_unsupported(tmp_path: Path) -> None:
    own = fake_v2(tmp_path, "cpu pids\n", "")
    with pytest.raises(Unsupported, match=r"lacks memory .*Delegate=yes"):
        CgroupTree.v2(own, "wrenbox")
    assert (own / "cgroup.subtree_control").read_text() == ""


def test_limits_from_the_sandbox_size() -> None:
    config = CgroupConfig()
    limits = CgroupLimits.for_sandbox(vcpus=4, memory_mib=1024, config=config, io_device="8:0")
    assert limits == CgroupLimits(cpu_quota_us=500_000, memory_bytes=1280 * MIB, pids_max=256)  # 4 + 1 CPUs
    with pytest.raises(InvalidArgument):
        CgroupLimits.for_sandbox(vcpus=0, memory_mib=1024, config=config)
    with pytest.raises(InvalidArgument):
        IoLimit("sda", read_bps=1)
