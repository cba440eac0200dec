"""E2B's wire shapes: request bodies as pydantic models, responses rendered from wrenbox's records.

Names and types follow E2B's OpenAPI and the SDK's generated models (camelCase, except the legacy
``allow_internet_access``). Request models allow fields wrenbox does not act on yet (``mcp``, ``iam``,
``volumeMounts``...): the SDK always sends some of them, and refusing them would break every caller.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from wrenbox.errors import InvalidArgument
from wrenbox.manager import Egress
from wrenbox.names import validate_name
from wrenbox.records import SandboxRecord, SandboxState, TemplateRecord

__all__ = [
    "ENVD_VERSION",
    "SHOWN_AS",
    "ConnectBody",
    "ForkBody",
    "NetworkOpts",
    "NewSandbox",
    "PauseBody",
    "SnapshotBody",
    "TimeoutBody",
    "Wire",
    "paginate",
    "public_state",
    "rfc3339",
    "template_name",
]

# What the guest agent implements, as E2B's SDK gates features on it (see e2b-api.md §6): octet-stream and
# gzip uploads, X-Metadata-* file metadata, close-stdin, watch entry info and the network-mount flag.
ENVD_VERSION = "0.6.4"
ALL_TRAFFIC = "0.0.0.0/0"
CLIENT_ID = "wrenbox"
DEFAULT_TAG = "default"

S = SandboxState
T = TypeVar("T")
_NAMESPACE = re.compile(r"[a-z0-9_-]+")
_BUILDS = uuid.UUID("5d8a1f0e-8c55-4f57-9b0e-7b6c2f0a9e11")  # namespace of wrenbox's build ids
# E2B knows two states: a sandbox on its way to paused is already ``paused``; one on its way out (or
# gone, or broken) is in neither and does not exist for callers.
SHOWN_AS: dict[str, frozenset[SandboxState]] = {
    "running": frozenset({S.CREATING, S.RUNNING, S.RESUMING, S.SNAPSHOTTING}),
    "paused": frozenset({S.PAUSING, S.PAUSED}),
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class AutoResume(_Body):
    enabled: StrictBool = False


class NetworkOpts(_Body):
    """E2B's ``network`` (create) and ``SandboxNetworkUpdateConfig`` (``PUT .../network``). wrenbox
    filters by address: ``allowOut``/``denyOut`` entries are IPv4 addresses or CIDRs."""

    allow_out: list[str] | None = Field(None, alias="allowOut", max_length=1024)
    deny_out: list[str] | None = Field(None, alias="denyOut", max_length=1024)
    allow_internet_access: StrictBool | None = None

    def egress(self, allow_internet_access: bool | None) -> Egress:
        """E2B's rules: no internet access denies everything not allowed; allow wins over deny."""
        deny = list(self.deny_out or [])
        if allow_internet_access is False:
            deny = [ALL_TRAFFIC]
        return Egress(allow=tuple(self.allow_out or ()), deny=tuple(deny))


class NewSandbox(_Body):
    """``POST /sandboxes`` (SDK 2.45) and ``POST /v2/sandboxes`` (2.63)."""

    template_id: str = Field(alias="templateID", min_length=1, max_length=256)
    timeout: StrictInt | None = Field(None, ge=1, le=86_400)
    secure: StrictBool = True
    allow_internet_access: StrictBool | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = Field(None, alias="envVars")
    auto_pause: StrictBool = Field(False, alias="autoPause")
    auto_pause_memory: StrictBool = Field(True, alias="autoPauseMemory")
    auto_resume: AutoResume | None = Field(None, alias="autoResume")
    network: NetworkOpts | None = None

    def egress(self) -> Egress | None:
        if self.network is None and self.allow_internet_access is None:
            return None
        return (self.network or NetworkOpts()).egress(self.allow_internet_access)


class ConnectBody(_Body):
    timeout: StrictInt | None = Field(None, ge=0, le=86_400)
    memory: StrictBool = True


class TimeoutBody(_Body):
    timeout: StrictInt = Field(ge=0, le=86_400)


class PauseBody(_Body):
    memory: StrictBool = True
    require_healthy_guest: StrictBool = Field(False, alias="requireHealthyGuest")


class SnapshotBody(_Body):
    name: str | None = Field(None, min_length=1, max_length=256)
    memory: StrictBool = True


class ForkBody(_Body):
    timeout: StrictInt | None = Field(None, ge=1, le=86_400)
    count: StrictInt = Field(1, ge=1, le=100)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def public_state(state: SandboxState) -> str | None:
    """The state E2B's callers see (see :data:`SHOWN_AS`); None for a sandbox that is not theirs to see."""
    return next((name for name, states in SHOWN_AS.items() if state in states), None)


def template_name(ref: str) -> str:
    """The template a caller's reference names: ``name``, ``name:tag``, ``namespace/name:tag`` (E2B's
    forms). wrenbox templates have one build each, so the only tag is ``default``."""
    namespace, _, name = ref.strip().rpartition("/")
    if namespace and not _NAMESPACE.fullmatch(namespace):
        raise InvalidArgument(f"template {ref!r}: a namespace is lower-case letters, digits, '-' and '_'")
    name, _, tag = name.partition(":")
    if tag and tag != DEFAULT_TAG:
        raise InvalidArgument(f"template {ref!r}: wrenbox templates have only the tag {DEFAULT_TAG!r}")
    return validate_name(name, what="template name")


def paginate(
    items: Iterable[T],
    key: Callable[[T], tuple[float, str]],
    *,
    descending: bool,
    after: str | None,
    limit: int,
) -> tuple[list[T], str | None]:
    """One page of ``items`` in ``key`` order (creation time, id), starting after the ``nextToken``
    ``after``, and the ``nextToken`` of the page after it (None on the last page)."""
    ordered = sorted(items, key=key, reverse=descending)
    if after:
        mark = _cursor_after(after)
        ordered = [i for i in ordered if (key(i) < mark if descending else key(i) > mark)]
    page = ordered[:limit]
    return page, (_make_cursor(*key(page[-1])) if len(ordered) > limit else None)


def _make_cursor(created_at: float, key: str) -> str:
    """A ``nextToken``: the position of the last item of a page, in (creation time, id) order."""
    return base64.urlsafe_b64encode(f"{created_at!r}|{key}".encode()).decode().rstrip("=")


def _cursor_after(token: str) -> tuple[float, str]:
    """Decode a ``nextToken`` (InvalidArgument if it is not one of ours)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        created, sandbox_id = raw.split("|", 1)
        return float(created), sandbox_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(f"invalid nextToken {token[:40]!r}") from None


class Wire:
    """Renders records as E2B's JSON for one server (its domain, its default disk size)."""

    def __init__(self, *, domain: str | None, disk_mb: int) -> None:
        self.domain = domain
        self.disk_mb = disk_mb

    def sandbox(self, rec: SandboxRecord) -> dict[str, Any]:
        """``Sandbox``: the answer to create, connect and fork."""
        return {
            "templateID": rec.template,
            "sandboxID": rec.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "alias": rec.template,
            "envdAccessToken": rec.access_token,
            "trafficAccessToken": None,
            "domain": self.domain,
        }

    def listed(self, rec: SandboxRecord) -> dict[str, Any]:
        """``ListedSandbox``: one entry of ``GET /v2/sandboxes``."""
        return {
            "templateID": rec.template,
            "alias": rec.template,
            "sandboxID": rec.id,
            "clientID": CLIENT_ID,
            "startedAt": rfc3339(rec.created_at),
            "endAt": rfc3339(end_at(rec)),
            "cpuCount": rec.vcpus,
            "memoryMB": rec.memory_mb,
            "diskSizeMB": rec.disk_mb or self.disk_mb,
            "metadata": rec.metadata,
            "state": public_state(rec.state),
            "envdVersion": ENVD_VERSION,
        }

    def detail(self, rec: SandboxRecord) -> dict[str, Any]:
        """``SandboxDetail``: ``GET /sandboxes/{id}``."""
        return self.listed(rec) | {
            "envdAccessToken": rec.access_token,
            "domain": self.domain,
            "allowInternetAccess": ALL_TRAFFIC not in rec.egress.get("deny", []) if rec.egress else None,
            "network": {"allowOut": rec.egress.get("allow", []), "denyOut": rec.egress.get("deny", [])},
            "lifecycle": {
                "onTimeout": "kill" if rec.on_timeout == "kill" else "pause",
                "autoResume": rec.auto_resume,
            },
            "pauseMode": "full" if rec.pause_memory else "filesystem",
        }

    @staticmethod
    def snapshot(t: TemplateRecord) -> dict[str, Any]:
        """``SnapshotInfo``."""
        return {"snapshotID": f"{t.name}:{DEFAULT_TAG}", "names": [f"{t.name}:{DEFAULT_TAG}"]}

    @staticmethod
    def template(t: TemplateRecord) -> dict[str, Any]:
        """An entry of ``GET /templates`` (the fields E2B's CLI shows)."""
        return {
            "templateID": t.name,
            "buildID": build_id(t),
            "cpuCount": t.vcpus,
            "memoryMB": t.memory_mb,
            "diskSizeMB": t.disk_mb,
            "public": t.team is None,
            "aliases": [t.name],
            "names": [t.name],
            "createdAt": rfc3339(t.created_at),
            "updatedAt": rfc3339(t.created_at),
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": 1,
            "buildStatus": "ready" if t.state.value == "ready" else "building",
            "envdVersion": ENVD_VERSION,
        }


def build_id(t: TemplateRecord) -> str:
    """The UUID E2B's clients expect of a build. A wrenbox template is one build, so its id is derived
    from the template (name and creation time): stable, and new when a name is reused."""
    return str(uuid.uuid5(_BUILDS, f"{t.name}@{t.created_at!r}"))


def end_at(rec: SandboxRecord) -> float:
    """When the sandbox times out. A paused one keeps the end it had (E2B's too); one without an end
    shows a day from now, which E2B's clients render like any other time."""
    if rec.end_at is not None:
        return rec.end_at
    if rec.timeout_s > 0:
        return rec.state_changed_at + rec.timeout_s
    return time.time() + 86_400
