"""E2B's sandbox endpoints, on the manager's face (:class:`~wrenbox.manager.Sandboxes`).

Status codes are E2B's, exactly: the SDK treats any other 2xx as "no body" and fails.
"""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from starlette.responses import JSONResponse

from wrenbox.api.context import Ctx, Team
from wrenbox.api.wire import (
    SHOWN_AS,
    ConnectBody,
    ForkBody,
    NetworkOpts,
    NewSandbox,
    PauseBody,
    SnapshotBody,
    TimeoutBody,
    paginate,
    public_state,
    rfc3339,
    template_name,
)
from wrenbox.errors import Conflict, InvalidArgument, NotFound, NotRunning
from wrenbox.manager import CreateRequest
from wrenbox.records import SandboxRecord, SandboxState

__all__ = ["router"]

router = APIRouter(tags=["sandboxes"])

S = SandboxState
_LIST_LIMIT = 100
_NO_CONTENT = Response(status_code=204)


def _created(body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=201)


async def _create(ctx: Ctx, team: str, body: NewSandbox) -> JSONResponse:
    template = ctx.template(team, body.template_id)
    rec = await ctx.sandboxes.create(
        CreateRequest(
            template=template.name,
            timeout_s=body.timeout,
            on_timeout="pause" if body.auto_pause else "kill",
            pause_memory=body.auto_pause_memory,
            auto_resume=body.auto_resume is not None and body.auto_resume.enabled,
            metadata=body.metadata or {},
            env=body.env_vars or {},
            team=team,
            egress=body.egress(),
        )
    )
    return _created(ctx.wire.sandbox(rec))


@router.post("/sandboxes", status_code=201, summary="Create a sandbox (SDK 2.45)")
async def create_v1(ctx: Ctx, team: Team, body: NewSandbox) -> JSONResponse:
    return await _create(ctx, team, body)


@router.post("/v2/sandboxes", status_code=201, summary="Create a sandbox (SDK 2.63)")
async def create_v2(ctx: Ctx, team: Team, body: NewSandbox) -> JSONResponse:
    return await _create(ctx, team, body)


@router.get("/sandboxes", summary="Running sandboxes (v1 list)")
def list_v1(ctx: Ctx, team: Team) -> list[dict[str, Any]]:
    return [ctx.wire.listed(r) for r in ctx.sandboxes.list(states={S.RUNNING}, team=team)]


def _metadata_filter(raw: str | None) -> dict[str, str] | None:
    """E2B's ``metadata`` query value: ``k=v&k2=v2`` quoted once more than a query string would be."""
    if raw is None:
        return None
    pairs: dict[str, str] = {}
    for part in urllib.parse.unquote(raw).split("&"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise InvalidArgument(f"metadata filter {part!r} is not key=value")
        pairs[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return pairs


def _states(raw: str | None) -> set[SandboxState]:
    names = SHOWN_AS.keys() if raw is None else list(filter(None, (p.strip() for p in raw.split(","))))
    wanted: set[SandboxState] = set()
    for name in names:
        if name not in SHOWN_AS:
            raise InvalidArgument(f"state must be 'running' or 'paused', not {name!r}")
        wanted |= SHOWN_AS[name]
    return wanted


@router.get("/v2/sandboxes", summary="Sandboxes, filtered and paginated")
def list_v2(
    ctx: Ctx,
    team: Team,
    response: Response,
    metadata: str | None = None,
    state: str | None = None,
    template: str | None = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    started_after: Annotated[datetime | None, Query(alias="startedAfter")] = None,
    limit: Annotated[int, Query(ge=1, le=_LIST_LIMIT)] = _LIST_LIMIT,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> list[dict[str, Any]]:
    template_filter = None
    if template is not None:
        try:
            template_filter = ctx.template(team, template, ready=False).name
        except (NotFound, InvalidArgument):
            return []  # E2B: an unknown template is an empty list, not an error
    recs = ctx.sandboxes.list(
        states=_states(state), metadata=_metadata_filter(metadata), template=template_filter, team=team
    )
    if started_after is not None:
        if started_after.tzinfo is None:
            raise InvalidArgument("startedAfter needs a time zone offset (e.g. +00:00 or Z)")
        # Compared as the datetimes E2B was shown (rounded to microseconds), not as floats: a
        # sandbox's own startedAt must match it.
        recs = [r for r in recs if datetime.fromtimestamp(r.created_at, UTC) >= started_after]
    page, following = paginate(
        recs, lambda r: (r.created_at, r.id), descending=order == "desc", after=next_token, limit=limit
    )
    if following:
        response.headers["x-next-token"] = following
    return [ctx.wire.listed(r) for r in page]


@router.get("/sandboxes/{sandbox_id}", summary="One sandbox")
def get_sandbox(ctx: Ctx, team: Team, sandbox_id: str) -> dict[str, Any]:
    return ctx.wire.detail(ctx.sandbox(team, sandbox_id))


@router.delete("/sandboxes/{sandbox_id}", status_code=204, summary="Kill a sandbox, running or paused")
async def kill(ctx: Ctx, team: Team, sandbox_id: str) -> Response:
    rec = ctx.sandbox(team, sandbox_id)
    await ctx.sandboxes.destroy(rec.id, team=team)
    return _NO_CONTENT


@router.post(
    "/sandboxes/{sandbox_id}/timeout", status_code=204, summary="Time out this many seconds from now"
)
def set_timeout(ctx: Ctx, team: Team, sandbox_id: str, body: TimeoutBody) -> Response:
    rec = ctx.sandbox(team, sandbox_id)
    ctx.sandboxes.set_timeout(rec.id, body.timeout, team=team)  # 0: now
    return _NO_CONTENT


@router.post("/sandboxes/{sandbox_id}/refreshes", status_code=204, summary="Keep a sandbox alive")
async def refresh(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[dict[str, Any] | None, Body()] = None
) -> Response:
    rec = ctx.sandbox(team, sandbox_id)
    duration = (body or {}).get("duration")
    if duration is None:
        ctx.sandboxes.ping(rec.id, team=team)
    elif not isinstance(duration, int) or isinstance(duration, bool) or not 0 <= duration <= 3600:
        raise InvalidArgument("duration must be 0 to 3600 seconds")
    elif rec.state is S.RUNNING:
        await ctx.sandboxes.connect(rec.id, duration, team=team)  # more time, never less
    return _NO_CONTENT


@router.put("/sandboxes/{sandbox_id}/network", status_code=204, summary="Replace the outbound rules")
async def update_network(ctx: Ctx, team: Team, sandbox_id: str, body: NetworkOpts) -> Response:
    rec = ctx.sandbox(team, sandbox_id)
    await ctx.sandboxes.set_egress(rec.id, body.egress(body.allow_internet_access), team=team)
    return _NO_CONTENT


@router.post("/sandboxes/{sandbox_id}/pause", status_code=204, summary="Pause (with memory, or disk only)")
async def pause(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[PauseBody | None, Body()] = None
) -> Response:
    rec = ctx.sandbox(team, sandbox_id)
    if rec.state is not S.RUNNING:
        raise Conflict(f"sandbox {rec.id} is already paused")
    await ctx.sandboxes.pause(rec.id, memory=(body or PauseBody()).memory, team=team)
    return _NO_CONTENT


async def _resume(ctx: Ctx, team: str, rec: SandboxRecord, body: ConnectBody) -> JSONResponse:
    resumed = await ctx.sandboxes.resume(rec.id, body.timeout, memory=body.memory, team=team)
    return _created(ctx.wire.sandbox(resumed))


async def _connect(ctx: Ctx, team: str, sandbox_id: str, body: ConnectBody) -> JSONResponse:
    rec = ctx.sandbox(team, sandbox_id)
    if rec.state in (S.PAUSING, S.PAUSED):  # a pause under way is waited for, then undone
        return await _resume(ctx, team, rec, body)
    if rec.state is not S.RUNNING:
        raise Conflict(f"sandbox {rec.id} is {rec.state.value}; connect again when that has finished")
    running = await ctx.sandboxes.connect(rec.id, body.timeout, team=team)
    return JSONResponse(ctx.wire.sandbox(running), status_code=200)


@router.post("/sandboxes/{sandbox_id}/connect", summary="Connect (resume if paused) (SDK 2.45)")
async def connect_v1(ctx: Ctx, team: Team, sandbox_id: str, body: ConnectBody) -> JSONResponse:
    return await _connect(ctx, team, sandbox_id, body)


@router.post("/v2/sandboxes/{sandbox_id}/connect", summary="Connect (resume if paused) (SDK 2.63)")
async def connect_v2(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[ConnectBody | None, Body()] = None
) -> JSONResponse:
    return await _connect(ctx, team, sandbox_id, body or ConnectBody())


@router.post(
    "/sandboxes/{sandbox_id}/resume", status_code=201, summary="Resume a paused sandbox (deprecated)"
)
async def resume(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[ConnectBody | None, Body()] = None
) -> JSONResponse:
    rec = ctx.sandbox(team, sandbox_id)
    if rec.state is not S.PAUSED:
        raise Conflict(f"sandbox {rec.id} is not paused")
    return await _resume(ctx, team, rec, body or ConnectBody())


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, summary="Fork a running sandbox")
async def fork(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[ForkBody | None, Body()] = None
) -> JSONResponse:
    rec = ctx.sandbox(team, sandbox_id)
    body = body or ForkBody()
    if rec.state is not S.RUNNING:
        raise NotRunning(f"sandbox {rec.id} is {public_state(rec.state)}; only running sandboxes fork")
    children = await ctx.sandboxes.fork(rec.id, body.count, team=team)
    if body.timeout is not None:
        children = [ctx.sandboxes.set_timeout(c.id, body.timeout, team=team) for c in children]
    return _created([{"sandbox": ctx.wire.sandbox(c)} for c in children])


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, summary="Snapshot a sandbox as a template")
async def snapshot(
    ctx: Ctx, team: Team, sandbox_id: str, body: Annotated[SnapshotBody | None, Body()] = None
) -> JSONResponse:
    rec = ctx.sandbox(team, sandbox_id)
    body = body or SnapshotBody()
    name = None if body.name is None else template_name(body.name)
    template = await ctx.sandboxes.snapshot(rec.id, name, team=team)
    return _created(ctx.wire.snapshot(template))


@router.get("/sandboxes/{sandbox_id}/metrics", summary="Metrics sampled every few seconds")
def metrics(
    ctx: Ctx, team: Team, sandbox_id: str, start: int | None = None, end: int | None = None
) -> list[dict[str, Any]]:
    rec = ctx.sandbox(team, sandbox_id)
    out = []
    for sample in ctx.sampler.series(rec.id, start, end):
        m = sample.guest
        out.append(
            {
                "timestamp": rfc3339(sample.at),
                "timestampUnix": int(sample.at),
                "cpuCount": m.cpu_count,
                "cpuUsedPct": m.cpu_used_pct,
                "memUsed": m.mem_used,
                "memTotal": m.mem_total,
                "memCache": 0,
                "diskUsed": m.disk_used,
                "diskTotal": m.disk_total,
            }
        )
    return out


@router.get("/sandboxes/{sandbox_id}/logs", summary="The sandbox's lifecycle log")
def logs(
    ctx: Ctx,
    team: Team,
    sandbox_id: str,
    start: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> dict[str, Any]:
    rec = ctx.sandbox(team, sandbox_id)
    entries = []
    for event in ctx.sandboxes.events(sandbox_id=rec.id, limit=10_000, team=team):
        if start is not None and event["ts"] * 1000 < start:
            continue
        detail = " ".join(f"{k}={v}" for k, v in event["detail"].items())
        line = f"{event['kind']} {detail}".strip()
        entries.append({"timestamp": rfc3339(event["ts"]), "level": "info", "message": line, "fields": {}})
    entries = entries[:limit]
    return {
        "logs": [{"timestamp": e["timestamp"], "line": e["message"]} for e in entries],
        "logEntries": entries,
    }
