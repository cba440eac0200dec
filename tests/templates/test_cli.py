"""``wrenbox template list|build`` through the CLI, on the session's data dir (no extra VM boots)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from wrenbox.cli import app
from wrenbox.config import Settings
from wrenbox.templates import Template

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.slow]


def wrenbox(settings: Settings, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args), env={"WRENBOX_DATA_DIR": str(settings.data_dir)})
    return result.exit_code, result.stdout, result.stderr


def test_list_shows_the_built_template(settings: Settings, template: Template) -> None:
    code, out, _ = wrenbox(settings, "template", "list", "--json")
    assert code == 0
    (listed,) = json.loads(out)
    assert listed == template.manifest.model_dump(mode="json")
    code, out, _ = wrenbox(settings, "template", "list")
    assert code == 0
    assert "minimal" in out
    assert f"{template.manifest.memory_mib} MiB" in out


def test_build_refuses_an_existing_or_bad_name(settings: Settings, template: Template) -> None:
    code, _, err = wrenbox(settings, "template", "build", "minimal")
    assert code == 1
    assert "already exists" in err
    code, _, err = wrenbox(settings, "template", "build", "../escape")
    assert code == 2
    assert "invalid template name" in err
