"""E2B's template and snapshot endpoints. A snapshot is a template made from a sandbox (E2B's model too):
its id works wherever a template name does, and ``DELETE /templates/{id}`` deletes it.

Template references arrive percent-encoded as one path segment (``team%2Fsnap%3Adefault``); the routes
take the rest of the path so an encoded ``/`` does not split them.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from wrenbox.api.context import Ctx, Team
from wrenbox.api.wire import DEFAULT_TAG, build_id, paginate, rfc3339, template_name
from wrenbox.errors import InvalidArgument, NotFound, PermissionDenied
from wrenbox.records import TemplateState

__all__ = ["router"]

router = APIRouter(tags=["templates"])


@router.get("/templates", summary="Templates this team may use")
def list_templates(ctx: Ctx, team: Team) -> list[dict[str, Any]]:
    return [
        ctx.wire.template(t)
        for t in ctx.sandboxes.templates(team=team)
        if t.state is not TemplateState.DELETING and t.kind not in ("snapshot", "fork")
    ]


@router.get("/templates/aliases/{alias}", summary="Whether a template name is taken")
def alias(ctx: Ctx, team: Team, alias: str) -> dict[str, Any]:
    name = template_name(alias)
    try:
        t = ctx.sandboxes.template(name, team=team)
    except NotFound:
        # E2B's contract: 403 says the name is taken by another team (names are global, and a
        # template of that name could not be made anyway); nothing else of it is shown.
        if any(other.name == name for other in ctx.sandboxes.templates()):
            raise PermissionDenied(f"template {alias!r} belongs to another team") from None
        raise NotFound(f"template {alias!r} not found") from None
    return {"templateID": t.name, "public": t.team is None}


@router.get("/templates/{template_id}/tags", summary="A template's tags (one build: 'default')")
def tags(ctx: Ctx, team: Team, template_id: str) -> list[dict[str, Any]]:
    t = ctx.template(team, template_id, ready=False)
    return [{"tag": DEFAULT_TAG, "buildID": build_id(t), "createdAt": rfc3339(t.created_at)}]


@router.get("/templates/{template_id:path}", summary="One template")
def get_template(ctx: Ctx, team: Team, template_id: str) -> dict[str, Any]:
    t = ctx.template(team, template_id, ready=False)
    return ctx.wire.template(t) | {"builds": []}


@router.delete("/templates/{template_id:path}", status_code=204, summary="Delete a template or snapshot")
async def delete_template(ctx: Ctx, team: Team, template_id: str) -> Response:
    t = ctx.template(team, template_id, ready=False)
    await ctx.sandboxes.delete_template(t.name, team=team)
    return Response(status_code=204)


@router.get("/snapshots", summary="Snapshots of this team's sandboxes")
def list_snapshots(
    ctx: Ctx,
    team: Team,
    response: Response,
    sandbox_id: Annotated[str | None, Query(alias="sandboxID")] = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    next_token: Annotated[str | None, Query(alias="nextToken")] = None,
) -> list[dict[str, Any]]:
    wanted = None
    if name is not None:
        try:
            wanted = template_name(name)
        except InvalidArgument:
            return []  # no snapshot can have that name
    found = [
        t
        for t in ctx.sandboxes.templates(team=team)
        if t.kind == "snapshot"
        and t.team == team
        and t.state is TemplateState.READY
        and (sandbox_id is None or t.source == sandbox_id)
        and (wanted is None or t.name == wanted)
    ]
    page, following = paginate(
        found, lambda t: (t.created_at, t.name), descending=True, after=next_token, limit=limit
    )
    if following:
        response.headers["x-next-token"] = following
    return [ctx.wire.snapshot(t) for t in page]
