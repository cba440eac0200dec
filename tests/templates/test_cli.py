"""``wrenbox template list|build`` through the CLI, on the session's data dir (no extra VM boots): the
CLI opens the data dir's manager, so it sees the template the session built, registered at its start."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from typer.testing import CliRunner

from wrenbox.cli import app
from wrenbox.config import Settings
from wrenbox.network import Network, NetworkConfig
from wrenbox.templates import Template

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cli_env(settings: Settings) -> Iterator[dict[str, str]]:
    """The session's data dir, with a network prefix and RAM dir of the CLI's own (removed afterwards)."""
    tag = secrets.token_hex(2)
    env = {
        "WRENBOX_DATA_DIR": str(settings.data_dir),
        "WRENBOX_MEMORY_DIR": f"/dev/shm/wtc-{tag}",
        "WRENBOX_NETWORK__PREFIX": f"wtc{tag}",
    }
    yield env
    anyio.run(Network(NetworkConfig(prefix=f"wtc{tag}")).teardown)
    Path(env["WRENBOX_MEMORY_DIR"]).rmdir()


def wrenbox(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_list_shows_the_built_template(cli_env: dict[str, str], template: Template) -> None:
    code, out, err = wrenbox(cli_env, "template", "list", "--json")
    assert code == 0, err
    (listed,) = json.loads(out)
    m = template.manifest
    assert (listed["name"], listed["kind"], listed["state"], listed["source"]) == (
        "minimal",
        "base",
        "ready",
        "minimal",
    )
    assert (listed["vcpus"], listed["memory_mb"], listed["path"]) == (
        m.vcpus,
        m.memory_mib,
        str(template.path),
    )
    code, out, _ = wrenbox(cli_env, "template", "list")
    assert code == 0
    assert "minimal" in out
    assert f"{m.memory_mib} MiB" in out


def test_build_refuses_an_existing_or_bad_name(cli_env: dict[str, str], template: Template) -> None:
    code, _, err = wrenbox(cli_env, "template", "build", "minimal")
    assert code == 1
    assert "already exists" in err
    code, _, err = wrenbox(cli_env, "template", "build", "../escape")
    assert code == 2
    assert "invalid template name" in err


def test_a_data_dir_in_use_is_refused(
    cli_env: dict[str, str], settings: Settings, template: Template
) -> None:
    """One wrenbox process per data dir: a second would sweep the first one's VMs as leftovers."""
    fd = os.open(settings.data_dir / "wrenbox.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242\n", 0)
        code, _, err = wrenbox(cli_env, "template", "list")
    finally:
        os.close(fd)
    assert code == 1
    assert "in use by another wrenbox process (pid 4242)" in " ".join(err.split())
    assert wrenbox(cli_env, "template", "list")[0] == 0  # free again
