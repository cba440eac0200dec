"""The composition root: the one place that turns :class:`~wrenbox.config.Settings` into components.

Every package below takes its own config object (``ManagerConfig``, ``RuntimeConfig``, ``RootfsConfig``,
``ImageConfig``, ``NetworkConfig``, ...); only this module (and the CLI, which calls it) reads
``Settings``. The host probe picks the VMM driver and the disk backend; this module builds exactly those,
so ``wrenbox doctor`` tells the truth about what runs::

    async with open_manager(settings) as sandboxes:           # the Sandboxes face, and nothing else
        await ensure_template(sandboxes, settings)            # image + template, built once and cached
        sb = await sandboxes.create(CreateRequest())

``open_manager`` takes the locks (one wrenbox process per data dir and per network prefix), probes the
host, installs the network's host table, opens the store, recovers whatever a previous run left
mid-operation, and runs the inactivity reaper. Leaving the block pauses (or destroys, per
``on_shutdown``) every running sandbox, so a restart finds them paused. ``open_host`` is the same with
the parts exposed, for tests of the runtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio

from wrenbox.config import Settings, TeamQuotaConfig
from wrenbox.errors import Conflict, NotFound, Unsupported
from wrenbox.fileio import private_dir
from wrenbox.images import ImageConfig, build_image, load_image
from wrenbox.images.builder import StepEvent
from wrenbox.launch import LaunchConfig, Launcher
from wrenbox.manager import ManagerConfig, Sandboxes, SandboxManager
from wrenbox.manager.quotas import TeamQuota
from wrenbox.manager.reaper import Reaper
from wrenbox.manager.reserve import Reserve
from wrenbox.manager.store import Store
from wrenbox.network import Network
from wrenbox.probe import HostCapabilities
from wrenbox.records import TemplateRecord, TemplateState
from wrenbox.rootfs import RootfsBackend, RootfsConfig, backend_for
from wrenbox.runtime.host import HostRuntime, RuntimeConfig
from wrenbox.templates import TemplateLibrary
from wrenbox.vmm import driver_for
from wrenbox.vmm.base import Driver
from wrenbox.vmm.cgroups import CgroupConfig, CgroupTree
from wrenbox.vmm.qemu import QemuDriver

__all__ = [
    "Host",
    "ensure_template",
    "image_config",
    "manager_config",
    "open_host",
    "open_manager",
    "probe_host",
    "rootfs_backend",
    "rootfs_config",
    "runtime_config",
    "serve",
    "vmm_driver",
]

log = logging.getLogger(__name__)

LOCK_FILE = "wrenbox.lock"
NETWORK_LOCKS = Path("/run/lock")


# -- Settings -> each component's config ------------------------------------------------------------------


def manager_config(settings: Settings) -> ManagerConfig:
    quotas = settings.quotas
    return ManagerConfig(
        max_sandboxes=settings.limits.max_sandboxes,
        max_concurrent_starts=settings.limits.max_concurrent_starts,
        max_guest_memory_mb=settings.limits.max_guest_memory_mb,
        ram_dir=settings.memory_dir,
        quota=team_quota(quotas),
        team_quotas={team: team_quota(quotas.of(team)) for team in quotas.teams},
        exec_output_cap_bytes=settings.limits.exec_output_cap_bytes,
        default_template=settings.defaults.template,
        default_timeout_s=settings.defaults.timeout_s,
        default_vcpus=settings.defaults.vcpus,
        default_memory_mb=settings.defaults.memory_mb,
        default_disk_mb=settings.defaults.disk_mb,
        on_shutdown=settings.on_shutdown,
    )


def team_quota(quota: TeamQuotaConfig) -> TeamQuota:
    return TeamQuota(
        max_running=quota.max_running,
        max_starting=quota.max_starting,
        max_paused=quota.max_paused,
        max_templates=quota.max_templates,
        max_disk_bytes=quota.max_disk_gb << 30,
    )


def runtime_config(settings: Settings) -> RuntimeConfig:
    return RuntimeConfig(
        sandboxes_dir=settings.sandboxes_dir,
        images_dir=settings.images_dir,
        memory_dir=settings.memory_dir,
    )


def rootfs_config(settings: Settings) -> RootfsConfig:
    return RootfsConfig(
        disks_dir=settings.data_dir / "disks",
        image_roots=(settings.images_dir, settings.templates_dir),
    )


def image_config(settings: Settings, **overrides: object) -> ImageConfig:
    """Images of the settings' data dir; ``overrides`` replace any field (the layer cache stays in the
    data dir even when ``images_dir`` is overridden, so layers are shared)."""
    images = settings.images_dir
    fields: dict[str, object] = {"images_dir": images, "cache_dir": images / ".cache", **overrides}
    return ImageConfig(**fields)  # type: ignore[arg-type]


def probe_host(settings: Settings, *, refresh: bool = False) -> HostCapabilities:
    return HostCapabilities.probe(settings.data_dir, settings.images_dir, refresh=refresh)


def vmm_driver(caps: HostCapabilities, *, seccomp: bool = True) -> Driver:
    """The VMM driver the product runs on this host: the one the probe chose."""
    driver = driver_for(caps.vmm.name, caps)
    if isinstance(driver, QemuDriver) and not seccomp:
        return QemuDriver(dataclasses.replace(driver.config, seccomp=False))
    return driver


def launcher(settings: Settings, caps: HostCapabilities) -> Launcher:
    """How the product starts VMs here: the probe's driver, VMMs confined, in cgroups where the host has
    them (``[cgroups] mode``: ``auto`` runs without and says why, ``required`` refuses, ``off``)."""
    vmm, dns = settings.vmm, tuple(str(a) for a in settings.network.dns_servers)
    if not vmm.confine:
        return Launcher(vmm_driver(caps, seccomp=False), LaunchConfig(vmm_uid_base=None, dns_servers=dns))
    config = LaunchConfig(vmm_uid_base=vmm.uid_base, vmm_gid=vmm.gid, dns_servers=dns)
    return Launcher(vmm_driver(caps), config, cgroups=vmm_cgroups(settings.cgroups))


def vmm_cgroups(config: CgroupConfig) -> tuple[CgroupTree, CgroupConfig] | None:
    if config.mode == "off":
        return None
    try:
        return CgroupTree.discover(config.group), config
    except Unsupported as exc:
        if config.mode == "required":
            raise
        log.warning("VMMs run without cgroups (no CPU, memory or pids limits per sandbox): %s", exc.message)
        return None


def rootfs_backend(settings: Settings, caps: HostCapabilities) -> RootfsBackend:
    """The disk backend the product uses on this host: the one the probe chose."""
    config = rootfs_config(settings)
    config.disks_dir.mkdir(parents=True, exist_ok=True)
    return backend_for(caps.rootfs.name, config)


# -- assembling ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """One data dir's parts, assembled. Only the manager is for callers; the rest is for tests of the
    runtime and for the service itself."""

    manager: SandboxManager
    runtime: HostRuntime
    store: Store
    network: Network
    caps: HostCapabilities


@asynccontextmanager
async def open_host(settings: Settings, *, reaper: bool = True) -> AsyncIterator[Host]:
    """Assemble, recover and serve one data dir (see the module doc); shut down on leaving."""
    # The data dir, 0700, keeps other local users out of what older versions made more open.
    private_dir(settings.data_dir)
    with _private_files(), _exclusive(settings):
        caps = await anyio.to_thread.run_sync(probe_host, settings)
        network = Network(settings.network)
        await network.setup()
        runtime = HostRuntime(
            runtime_config(settings),
            network=network,
            rootfs=rootfs_backend(settings, caps),
            launcher=launcher(settings, caps),
            templates=TemplateLibrary(settings.templates_dir),
        )
        with Store(settings.state_db, reserve=Reserve.beside(settings.state_db)) as store:
            mgr = SandboxManager(manager_config(settings), store, runtime)
            await mgr.recover()
            failure: BaseException | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(mgr.watch_vms)
                if reaper:
                    tg.start_soon(Reaper(mgr, watches=[mgr.check_host]).run)
                try:
                    yield Host(mgr, runtime, store, network, caps)
                except BaseException as exc:  # raised below as it is, not wrapped in the group's
                    failure = exc
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        await mgr.shutdown()
            if failure is not None:
                raise failure


@asynccontextmanager
async def open_manager(settings: Settings, *, reaper: bool = True) -> AsyncIterator[SandboxManager]:
    """The manager of one data dir (:class:`~wrenbox.manager.Sandboxes`), recovered and serving."""
    async with open_host(settings, reaper=reaper) as host:
        yield host.manager


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Every file wrenbox makes while the host is open is its own (tokens, tenants' memory and disks):
    umask 077, and the caller's umask back afterwards (it is the whole process's)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@contextlib.contextmanager
def _exclusive(settings: Settings) -> Iterator[None]:
    """One wrenbox process per data dir and per network prefix: a second would sweep the first one's
    VMs, disks and slots as leftovers of a crash."""
    with _flock(settings.data_dir / LOCK_FILE, f"the data dir {settings.data_dir}"):
        prefix = settings.network.prefix
        with _flock(NETWORK_LOCKS / f"wrenbox-net-{prefix}.lock", f"the network prefix {prefix!r}"):
            yield


@contextlib.contextmanager
def _flock(path: Path, what: str) -> Iterator[None]:
    """An exclusive flock on ``path``, holding our PID: it goes with the process however that ends, and
    VMMs we start do not inherit it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise Conflict(f"{what} is in use by another wrenbox process (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- templates ---------------------------------------------------------------------------------------------


async def ensure_template(
    sandboxes: Sandboxes,
    settings: Settings,
    name: str = "minimal",
    *,
    image: str = "minimal",
    on_step: Callable[[str], None] | None = None,
) -> TemplateRecord:
    """Template ``name`` ready to use: built from image ``image`` (built too if missing) on first use."""
    with contextlib.suppress(NotFound):
        found = sandboxes.template(name)
        if found.state is TemplateState.READY:
            return found
    try:
        load_image(settings.images_dir, image)
    except NotFound:
        if on_step:
            on_step(f"building image {image}")

        def image_step(event: StepEvent) -> None:
            if on_step and event.status == "start":
                on_step(f"image {image}: {event.step}")

        config = image_config(settings)
        await anyio.to_thread.run_sync(lambda: build_image(config, image, on_step=image_step))
    if on_step:
        on_step(f"building template {name}")
    return await sandboxes.build_template(
        name,
        image=image,
        on_step=None if on_step is None else lambda step: on_step(f"template {name}: {step}"),
    )


# -- the server --------------------------------------------------------------------------------------------


async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run ``wrenbox serve`` until SIGTERM or SIGINT: the data dir's manager behind the API (E2B's REST
    API and the sandbox proxy, one port). Stopping pauses every running sandbox; the next start finds
    them paused, where they were. ``on_ready`` hears the URL once the port is listening."""
    import signal

    import uvicorn

    from wrenbox.api import KeyStore, create_app
    from wrenbox.api.proxy import QuietCuts

    host = settings.api.host if host is None else host
    port = settings.api.port if port is None else port
    with KeyStore(settings.keys_db) as keys:
        async with open_manager(settings) as sandboxes:
            for name in dict.fromkeys((settings.defaults.template, *settings.api.templates)):
                await ensure_template(sandboxes, settings, name, image=name, on_step=log.info)
            app = create_app(
                sandboxes,
                keys,
                domain=settings.api.domain,
                disk_mb=settings.defaults.disk_mb,
                metrics_interval_s=settings.api.metrics_interval_s,
                head_timeout_s=settings.api.head_timeout_s,
            )
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                lifespan="on",
                http=app.http_protocol,
                log_level=settings.log_level,
                timeout_graceful_shutdown=10,
                # Longer than clients keep idle connections (hyper, under E2B's SDK: 90 s), so the
                # client closes first: a server closing a connection just as a request goes out on it
                # resets that request (uvicorn's default of 5 s did, to a caller that slept 5 s).
                timeout_keep_alive=120,
                access_log=False,
                log_config=None,  # the process's logging (wrenbox serve sets it up) carries uvicorn's too
            )
            server = uvicorn.Server(config)
            logging.getLogger("uvicorn.error").addFilter(QuietCuts())
            # uvicorn re-raises the signal that stopped it once it has stopped; with the default handlers
            # that would end the process before the manager pauses the sandboxes. Ours let it return.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve)
                while not server.started:
                    if server.should_exit:
                        break
                    await anyio.sleep(0.05)
                if server.started and on_ready is not None:
                    bound = server.servers[0].sockets[0].getsockname()  # the real port when asked for 0
                    on_ready(f"http://{host}:{bound[1]}")
