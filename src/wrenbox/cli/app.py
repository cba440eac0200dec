"""The ``wrenbox`` command line. Commands are thin: parse, call the library, render.

Exit codes: 0 success, 1 failure (any wrenbox error not listed below), 2 bad input, 3 this host lacks
something (a missing tool or capability), 4 not found, 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from wrenbox.config import Settings, load_settings
from wrenbox.errors import InvalidArgument, NotFound, Unsupported, WrenboxError

if TYPE_CHECKING:
    from wrenbox.manager import Sandboxes
    from wrenbox.probe import HostCapabilities
    from wrenbox.records import TemplateRecord

T = TypeVar("T")

__all__ = ["app", "console", "err_console", "fail", "load", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Self-hosted microVM sandboxes.")
image_app = typer.Typer(no_args_is_help=True, help="Guest images (kernel, initramfs, root filesystem).")
app.add_typer(image_app, name="image")
template_app = typer.Typer(no_args_is_help=True, help="Templates: pre-booted snapshots sandboxes start from.")
app.add_typer(template_app, name="template")

console = Console()
err_console = Console(stderr=True)


def _exit_code(exc: WrenboxError) -> int:
    if isinstance(exc, InvalidArgument):
        return 2
    if isinstance(exc, Unsupported):
        return 3
    if isinstance(exc, NotFound):
        return 4
    return 1


def fail(exc: WrenboxError) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    raise typer.Exit(_exit_code(exc))


def load() -> Settings:
    """The settings, or exit 2 naming the bad one."""
    try:
        return load_settings()
    except WrenboxError as exc:
        fail(exc)


def _yes_no(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print the probe result as JSON.")] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Probe again instead of using the cache.")
    ] = False,
) -> None:
    """Probe what this host can do and show which backends wrenbox will use, and why."""
    from wrenbox.service import probe_host, rootfs_backend, vmm_driver

    settings = load()
    try:
        with console.status("probing the host (the first run tries to boot a KVM guest)…"):
            caps = probe_host(settings, refresh=refresh)
        # What the product builds from this probe, by the same calls (named here, not guessed).
        driver = vmm_driver(caps).name if caps.vmm.name != "none" else "none"
        disks = rootfs_backend(settings, caps).name
        confinement = _confinement(settings, driver)
    except WrenboxError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps(caps.model_dump(mode="json") | {"accel": caps.accel}, indent=2))
    else:
        _render_capabilities(caps, driver, disks)
        console.print(f"[bold]confinement[/]: {confinement}", highlight=False)
        console.print(f"[bold]store reserve[/]: {_store_reserve(settings)}", highlight=False)
    if caps.vmm.name == "none":
        raise typer.Exit(3)


def _confinement(settings: Settings, driver: str) -> str:
    """How VMMs will be confined here (the cgroup part found without changing anything)."""
    from wrenbox.vmm.cgroups import find_hierarchy

    if not settings.vmm.confine or driver != "qemu":
        why = "vmm.confine = false" if not settings.vmm.confine else f"the {driver} driver"
        return f"off: VMMs run as root, unconfined ({why})"
    jail = f"each VMM as uid {settings.vmm.uid_base}+slot in a root of its own, QEMU seccomp on"
    if settings.cgroups.mode == "off":
        return f"{jail}; no cgroups (cgroups.mode = off)"
    try:
        return f"{jail}; per-slot cgroups in {find_hierarchy()}"
    except Unsupported as exc:
        return f"{jail}; [yellow]no cgroups[/]: {exc.message}"


def _store_reserve(settings: Settings) -> str:
    """How much of the room kept for the store on a full disk is held (wrenbox.manager.reserve)."""
    from wrenbox.manager.reserve import Reserve

    reserve = Reserve.beside(settings.state_db)
    if not reserve.directory.exists():
        return "none yet: made when wrenbox first opens its data dir"
    held, size = _size(reserve.held()), _size(reserve.size)
    if reserve.held() == reserve.size:
        return f"{held} held beside the store ({reserve.directory})"
    return (
        f"[yellow]{held} of {size}[/] held ({reserve.directory}): the data filesystem was full; "
        "it is made whole again once there is room"
    )


def _render_capabilities(caps: HostCapabilities, driver: str, disks: str) -> None:
    table = Table(title="host capabilities", title_justify="left")
    table.add_column("capability")
    table.add_column("ok")
    table.add_column("detail", overflow="fold")
    qemu = caps.qemu
    table.add_row(
        "QEMU", _yes_no(qemu is not None), f"{qemu.version} at {qemu.path}" if qemu else "not installed"
    )
    table.add_row(
        "KVM runs a Linux guest", _yes_no(caps.kvm.usable), f"{caps.kvm.detail} [{caps.kvm.method}]"
    )
    table.add_row("Firecracker", _yes_no(caps.firecracker is not None), caps.firecracker or "not installed")
    tsc = f"{caps.tsc_khz} kHz ({caps.tsc_source})" if caps.tsc_khz else caps.tsc_source
    table.add_row("host TSC", _yes_no(caps.tsc_khz is not None), tsc)
    table.add_row("device-mapper", _yes_no(caps.device_mapper.ok), caps.device_mapper.detail)
    table.add_row("reflink in data dir", _yes_no(caps.reflink.ok), caps.reflink.detail)
    table.add_row("userfaultfd", _yes_no(caps.userfaultfd.ok), caps.userfaultfd.detail)
    for name, check in caps.network:
        table.add_row(name, _yes_no(check.ok), check.detail)
    res = caps.resources
    table.add_row("free disk", "", f"{_size(res.disk_free_bytes)} in {caps.data_dir}")
    table.add_row(
        "memory", "", f"{_size(res.memory_available_bytes)} available of {_size(res.memory_total_bytes)}"
    )
    console.print(table)

    tools = Table(title="host tools", title_justify="left")
    for column in ("tool", "found", "Debian package", "needed for"):
        tools.add_column(column)
    for tool in caps.tools:
        found = tool.path or ("[red]missing[/]" if tool.required else "[yellow]missing (optional)[/]")
        tools.add_row(tool.name, found, tool.package, tool.needed_for)
    console.print(tools)

    accel = f" ({caps.accel.upper()})" if driver == "qemu" else ""
    console.print(f"[bold]vmm[/]:    {driver}{accel} — {caps.vmm.why}", highlight=False)
    console.print(f"[bold]rootfs[/]: {disks} — {caps.rootfs.why}", highlight=False)
    if caps.missing_tools:
        packages = " ".join(sorted({t.package for t in caps.missing_tools}))
        console.print(f"[yellow]install the missing tools:[/] apt-get install {packages}", highlight=False)


@image_app.command("build")
def image_build(
    name: Annotated[str, typer.Option("--name", help="Image name.")] = "minimal",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if nothing changed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Build a guest image from Debian packages (cached: unchanged layers are reused)."""
    from wrenbox.images import StepEvent, build_image
    from wrenbox.service import image_config

    out = err_console if as_json else console

    with out.status("building image…") as status:

        def on_step(event: StepEvent) -> None:
            if event.status == "start":
                status.update(f"{name}: {event.step}…")
            else:
                note = " [dim](cached)[/]" if event.status == "cached" else ""
                out.print(f"  [green]✓[/] {event.step:<12} {event.seconds:6.1f} s{note}", highlight=False)

        try:
            result = build_image(image_config(load()), name, force=force, on_step=on_step)
        except WrenboxError as exc:
            fail(exc)
    image = result.image
    if as_json:
        typer.echo(image.manifest.model_dump_json(indent=2))
        return
    verdict = "up to date (nothing rebuilt)" if result.cached else "built"
    out.print(f"image [bold]{name}[/] {verdict}: {image.path}", highlight=False)
    kernel = image.manifest.kernel
    out.print(f"  kernel {kernel.package} {kernel.version}", highlight=False)
    for role, info in image.manifest.files.items():
        out.print(
            f"  {role:<9} {info.name:<18} {_size(info.size):>10} ({_size(info.allocated)} on disk) "
            f"sha256 {info.sha256[:16]}",
            highlight=False,
        )


@template_app.command("build")
def template_build(
    name: Annotated[str, typer.Argument(help="Template name.")] = "minimal",
    image: Annotated[str, typer.Option("--image", help="Image to boot.")] = "minimal",
    vcpus: Annotated[int | None, typer.Option("--vcpus", help="vCPUs (default: settings).")] = None,
    memory_mib: Annotated[
        int | None, typer.Option("--memory-mib", help="Guest RAM in MiB (default: settings).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the template as JSON.")] = False,
) -> None:
    """Boot an image once, wait for its agent and snapshot it as a template (immutable once built)."""
    out = err_console if as_json else console
    settings = load()
    with out.status(f"building template {name}…") as status:

        async def build(sandboxes: Sandboxes) -> TemplateRecord:
            return await sandboxes.build_template(
                name,
                image=image,
                vcpus=vcpus,
                memory_mb=memory_mib,
                on_step=lambda step: status.update(f"{name}: {step}…"),
            )

        template = _with_manager(settings, build)
    if as_json:
        typer.echo(json.dumps(_template_json(template), indent=2))
        return
    out.print(f"template [bold]{name}[/] built: {template.path}", highlight=False)
    out.print(
        f"  {template.vcpus} vCPU, {template.memory_mb} MiB, from image {template.source}, "
        f"{_size(template.size_bytes)} on disk",
        highlight=False,
    )


@template_app.command("list")
def template_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print the templates as JSON.")] = False,
) -> None:
    """List the templates of this host."""

    async def templates(sandboxes: Sandboxes) -> list[TemplateRecord]:
        return sandboxes.templates()

    found = _with_manager(load(), templates)
    if as_json:
        typer.echo(json.dumps([_template_json(t) for t in found], indent=2))
        return
    table = Table(title="templates", title_justify="left")
    for column in ("name", "kind", "state", "from", "vCPU", "memory", "on disk", "created"):
        table.add_column(column)
    for t in found:
        table.add_row(
            t.name,
            t.kind,
            t.state.value,
            t.source or "",
            str(t.vcpus),
            f"{t.memory_mb} MiB",
            _size(t.size_bytes),
            datetime.fromtimestamp(t.created_at).strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


def _with_manager(settings: Settings, work: Callable[[Sandboxes], Awaitable[T]]) -> T:
    """Run ``work`` against this data dir's manager (the server's, once there is one)."""
    import anyio

    from wrenbox.service import open_manager

    async def main() -> T:
        async with open_manager(settings, reaper=False) as sandboxes:
            return await work(sandboxes)

    try:
        return anyio.run(main)
    except WrenboxError as exc:
        fail(exc)


def _template_json(t: TemplateRecord) -> dict[str, object]:
    data = dataclasses.asdict(t)
    data["state"] = t.state.value
    return data


@app.command()
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per step.")] = False,
    url: Annotated[
        str | None,
        typer.Option(
            "--url",
            help="A wrenbox server already running on this machine's data dir (default: the one that holds "
            "the data dir, or one started on a free loopback port and stopped afterwards).",
        ),
    ] = None,
) -> None:
    """Run the whole sandbox lifecycle once through the server (E2B's SDK) and time each step (the first
    server start builds the image and template)."""
    from wrenbox.demo import DemoStep, run_demo

    settings = load()

    def report(step: DemoStep) -> None:
        if as_json:
            line = {"step": step.step, "seconds": step.seconds, "ok": step.ok, "detail": step.detail}
            print(json.dumps(line), flush=True)
            if not step.ok:
                err_console.print(f"[red]{step.step} failed:[/] {step.detail}", highlight=False)
        else:
            mark = "[green]ok[/]" if step.ok else "[bold red]FAILED[/]"
            console.print(f"{step.step:<22} {step.seconds:8.3f} s  {mark}  {step.detail}", highlight=False)

    def progress(message: str) -> None:
        err_console.print(message, style="dim", highlight=False, markup=False, soft_wrap=True)

    try:
        ok = run_demo(settings, report, progress, url=url)
    except WrenboxError as exc:
        fail(exc)
    if as_json:
        print(json.dumps({"ok": ok}), flush=True)
    else:
        console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed[/]")
    raise typer.Exit(0 if ok else 1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None
