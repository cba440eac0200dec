"""The ``base`` template: what E2B's SDK creates when no template is named, with what E2B's own tests and
users' code expect to find in it."""

from __future__ import annotations

import pytest
from e2b import Sandbox

from .conftest import Server

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]


def test_the_default_template_has_what_e2b_code_expects(e2b_env: Server) -> None:
    sb = Sandbox.create()  # no template: E2B's SDK asks for "base"
    assert sb.get_info().template_id == "base"
    tools = "bash curl git pgrep ps ss tput pip python python3 sudo"
    found = sb.commands.run(f"for t in {tools}; do command -v $t >/dev/null && echo $t; done").stdout
    assert found.split() == tools.split()
    assert sb.commands.run("whoami").stdout.strip() == "user"
    assert sb.commands.run("sudo -n whoami").stdout.strip() == "root"  # no password
    assert sb.commands.run("python --version").stdout.startswith("Python 3")
    assert sb.commands.run("git --version").stdout.startswith("git version 2.")
    assert sb.commands.run("test -x $(git --exec-path)/git-daemon && echo ok").stdout == "ok\n"
    assert sb.commands.run("tput -T xterm cols").exit_code == 0
    assert sb.commands.run("ls /etc/ssl/certs/ca-certificates.crt").exit_code == 0


def test_sandboxes_have_a_ten_gib_root_that_costs_what_is_written(e2b_env: Server) -> None:
    sb = Sandbox.create("minimal")
    with e2b_env.http() as http:
        assert http.get(f"/sandboxes/{sb.sandbox_id}").json()["diskSizeMB"] == 10 * 1024
    size_mb, avail_mb = map(
        int, sb.commands.run("df -BM --output=size,avail / | tail -1 | tr -d M").stdout.split()
    )
    assert size_mb > 9 * 1024
    assert avail_mb > 8 * 1024  # room to install real things
    sb.commands.run("sudo -n dd if=/dev/zero of=/big bs=1M count=300 status=none && sync")
    assert sb.commands.run("df -BM --output=used / | tail -1 | tr -d M").stdout.strip()
    templates = e2b_env.settings.templates_dir
    image = next(templates.glob("minimal/rootfs*"))
    assert image.stat().st_size >= 10 * 2**30  # the template's disk: 10 GiB long ...
    assert image.stat().st_blocks * 512 < 2 * 2**30  # ... and sparse
