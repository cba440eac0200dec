"""Who a request acts as: the sandbox's default user, or one named per request."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from wrenbox.errors import PermissionDenied, Unauthenticated

__all__ = ["DEFAULT_SANDBOX_USER", "User", "default_user", "lookup_user"]

# Like E2B's base template: commands and files belong to `user` (uid 1000, home /home/user).
DEFAULT_SANDBOX_USER = "user"


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def of_entry(cls, entry: pwd.struct_passwd) -> User:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir or "/", entry.pw_shell)

    def groups(self) -> list[int]:
        return os.getgrouplist(self.name, self.gid)

    def check_can_act_as(self) -> None:
        """An unprivileged agent (tests on the host) can only act as itself."""
        euid = os.geteuid()
        if euid != 0 and euid != self.uid:
            raise PermissionDenied(
                f"the agent runs as uid {euid} and cannot act as user {self.name!r} (uid {self.uid})"
            )


def lookup_user(name: str) -> User:
    """The account called ``name``; Unauthenticated if there is none (as envd answers)."""
    if not name or "\0" in name or len(name) > 256:
        raise Unauthenticated(f"invalid username {name!r}")
    try:
        return User.of_entry(pwd.getpwnam(name))
    except KeyError:
        raise Unauthenticated(f"user {name!r} does not exist in the sandbox") from None


def default_user() -> tuple[User, bool]:
    """The default user and whether it is the sandbox user (False: fell back to the invoking user)."""
    try:
        return User.of_entry(pwd.getpwnam(DEFAULT_SANDBOX_USER)), True
    except KeyError:
        return User.of_entry(pwd.getpwuid(os.geteuid())), False
