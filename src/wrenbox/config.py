"""Settings: defaults, overridden by a TOML file, overridden by ``WRENBOX_*`` environment variables.

Precedence (highest first): keyword arguments to :func:`load_settings`, environment variables
(``WRENBOX_DATA_DIR``, nested groups with a double underscore: ``WRENBOX_LIMITS__MAX_SANDBOXES=8``), the
TOML file (``WRENBOX_CONFIG`` or ``/etc/wrenbox/wrenbox.toml`` when present), then the defaults below.

The TOML file uses the same names, groups as tables::

    data_dir = "/srv/wrenbox"
    [limits]
    max_sandboxes = 8

Components receive the group they need (``settings.limits``, ...) rather than the whole object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from wrenbox.network.plan import NetworkConfig
from wrenbox.vmm.cgroups import CgroupConfig

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "ApiConfig",
    "LimitsConfig",
    "QuotasConfig",
    "SandboxDefaults",
    "Settings",
    "TeamQuotaConfig",
    "VmmConfig",
    "load_settings",
]

DEFAULT_CONFIG_FILE = Path("/etc/wrenbox/wrenbox.toml")


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiConfig(_Group):
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=1, le=65535)
    # Sandboxes' own host names are ``<port>-<sandbox id>.<domain>`` (E2B's scheme); ``*.localhost``
    # resolves to this machine without any DNS set-up.
    domain: str = "localhost"
    metrics_interval_s: float = Field(5.0, gt=0)
    # A connection whose request head (request line and headers) is not complete this long after it
    # opened, or after its last response, is closed: slow clients must not hold connections forever.
    head_timeout_s: float = Field(20.0, gt=0)
    # Templates ``wrenbox serve`` makes ready before it listens, each from the image of the same name
    # (built on first start): ``base`` is what E2B's SDK creates when no template is named.
    templates: tuple[str, ...] = ("base",)


class LimitsConfig(_Group):
    max_sandboxes: int = Field(32, ge=1)
    max_concurrent_starts: int = Field(4, ge=1)
    # What the guest memory of live sandboxes may add up to (MiB); a start beyond it, or one whose RAM
    # file would not fit in ``memory_dir`` now, is refused (429). None: four fifths of the host's RAM.
    max_guest_memory_mb: int | None = Field(None, ge=64)
    exec_output_cap_bytes: int = Field(16 * 1024 * 1024, ge=1024)


class TeamQuotaConfig(_Group):
    """What one team (an API key's) may hold at once; the manager refuses more (429)."""

    max_running: int = Field(20, ge=0)  # live sandboxes (running, starting, resuming)
    max_starting: int = Field(4, ge=1)  # creates, resumes and fork children in flight
    max_paused: int = Field(100, ge=0)
    max_templates: int = Field(50, ge=0)  # snapshots included
    max_disk_gb: int = Field(100, ge=0)  # paused sandboxes' snapshots and disks, and templates (GiB)


class QuotasConfig(TeamQuotaConfig):
    """Every team's quota, and per-team overrides of any of its fields::

    [quotas]
    max_paused = 20
    [quotas.teams.research]
    max_paused = 200
    """

    teams: dict[str, dict[str, int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _overrides_are_quotas(self) -> QuotasConfig:
        for team, fields in self.teams.items():
            unknown = set(fields) - set(TeamQuotaConfig.model_fields)
            if unknown:
                raise ValueError(f"team {team}: no quota named {', '.join(sorted(unknown))}")
            self.of(team)
        return self

    def of(self, team: str) -> TeamQuotaConfig:
        return TeamQuotaConfig(**self.model_dump(exclude={"teams"}) | self.teams.get(team, {}))


class SandboxDefaults(_Group):
    template: str = "minimal"
    vcpus: int = Field(1, ge=1, le=64)
    memory_mb: int = Field(512, ge=64)
    timeout_s: int = Field(300, ge=0)
    on_timeout: Literal["pause", "kill"] = "pause"
    # The root disk of templates built without saying; their sandboxes get the same. Sparse on the host
    # (it costs what is written) and grown into by the guest's filesystem at the template's boot.
    disk_mb: int = Field(10 * 1024, ge=64)


class VmmConfig(_Group):
    # Each VMM as a user of its own (uid_base + its slot's index, group gid) in a root of its own, under
    # QEMU's seccomp policy and in its slot's cgroups (wrenbox.vmm.jail). Off only to measure what it costs.
    confine: bool = True
    uid_base: int = Field(2_000_000_000, ge=1000, le=4_000_000_000)
    gid: int = Field(2_000_000_000, ge=1000, le=4_294_967_294)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="WRENBOX_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    data_dir: Path = Path("/var/lib/wrenbox")
    # Guest RAM of running sandboxes (tmpfs: no disk writeback while they run; moved to disk on pause).
    memory_dir: Path = Path("/dev/shm/wrenbox")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    on_shutdown: Literal["pause", "destroy"] = "pause"
    api: ApiConfig = ApiConfig()
    limits: LimitsConfig = LimitsConfig()
    quotas: QuotasConfig = QuotasConfig()
    defaults: SandboxDefaults = SandboxDefaults()
    # Slots, the host firewall and what guests may reach (never_ranges, the DNS exception, per-slot
    # connection limits): see NetworkConfig.
    network: NetworkConfig = NetworkConfig()
    vmm: VmmConfig = VmmConfig()
    # Each VMM in a cgroup of its own (CPU, memory, pids, I/O from the sandbox's size): see
    # wrenbox.vmm.cgroups. ``[cgroups] memory_overhead_mib`` is QEMU's allowance beyond guest RAM.
    cgroups: CgroupConfig = CgroupConfig()

    # Layout of the data dir. Derived, never configured separately, so one setting moves everything.
    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def templates_dir(self) -> Path:
        return self.data_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def run_dir(self) -> Path:
        """Sockets and other per-boot files."""
        return self.data_dir / "run"

    @property
    def state_db(self) -> Path:
        return self.data_dir / "state.db"

    @property
    def keys_db(self) -> Path:
        """The API server's keys (hashed)."""
        return self.data_dir / "keys.db"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = _config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _config_file() -> Path | None:
    named = os.environ.get("WRENBOX_CONFIG")
    if named:
        path = Path(named)
        if not path.is_file():
            from wrenbox.errors import InvalidArgument

            raise InvalidArgument(f"WRENBOX_CONFIG names {path}, which is not a file")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Read the settings; a bad value raises InvalidArgument naming the setting."""
    from pydantic import ValidationError

    from wrenbox.errors import InvalidArgument

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise InvalidArgument(f"invalid wrenbox settings: {problems}") from exc
