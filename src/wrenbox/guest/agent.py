"""The agent: the one object that holds the guest's state (built once, in ``__main__``)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .processes import ProcessLimits, ProcessTable
from .users import User, default_user, lookup_user

if TYPE_CHECKING:
    from .init import HostClock
    from .watch import Watchers

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger("wrenbox.guest")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    host: str = "127.0.0.1"
    port: int = 49983
    processes: ProcessLimits = field(default_factory=ProcessLimits)
    keepalive: float = 90.0  # seconds between keepalive events when the client names no interval
    # An idle connection is closed after this long; so is one whose request headers never complete.
    # Longer than the SDK's 60 s request timeout, so the SDK's pooled connections stay usable.
    keep_alive_timeout: float = 65.0
    body_timeout: float = 60.0  # a request body that stalls this long is refused (see asgi.stall_limited)
    max_watchers: int = 256
    max_watcher_events: int = 10_000


class Agent:
    """State shared by every endpoint: users, defaults from /init, the access token, processes."""

    def __init__(self, config: AgentConfig, host: HostClock | None = None) -> None:
        self.config = config
        self._host = host
        self.default_user, sandbox_user = default_user()
        if not sandbox_user:
            log.warning(
                "user 'user' does not exist here: commands and files default to %s (uid %d)",
                self.default_user.name,
                self.default_user.uid,
            )
        self.default_workdir: str | None = None
        self.env_vars: dict[str, str] = {}
        self.access_token: str | None = None
        self.processes = ProcessTable(config.processes)
        self._watchers: Watchers | None = None

    @property
    def host(self) -> HostClock:
        """The privileged kernel operations of /init (loaded on first use)."""
        if self._host is None:
            from .init import HostClock

            self._host = HostClock()
        return self._host

    @property
    def watchers(self) -> Watchers:
        """Directory watchers; the inotify module loads on first use."""
        if self._watchers is None:
            from .watch import Watchers

            self._watchers = Watchers(self.config.max_watchers, self.config.max_watcher_events)
        return self._watchers

    def user_for(self, name: str | None) -> User:
        """The named user, or the default user when no name is given."""
        if not name:
            return self.default_user
        if name == self.default_user.name:
            return self.default_user
        return lookup_user(name)

    def process_env(self, user: User, extra: dict[str, str]) -> dict[str, str]:
        """What a process sees: a clean base, then /init's variables, then the request's (envd's order)."""
        env = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "HOME": user.home,
            "USER": user.name,
            "LOGNAME": user.name,
        }
        env.update(self.env_vars)
        env.update(extra)
        return env

    def shutdown(self) -> None:
        self.processes.kill_all()
        if self._watchers is not None:
            self._watchers.close_all()
