"""API keys: made once, stored hashed, revoked for good; and the ``wrenbox keys`` commands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wrenbox.api.keys import KeyStore
from wrenbox.cli import app
from wrenbox.errors import InvalidArgument, NotFound, Unauthenticated


def test_a_key_authenticates_as_its_team_and_is_stored_only_hashed(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as keys:
        made = keys.create(name="ci", team="blue")
        assert made.secret.startswith("e2b_")
        assert len(made.secret) == 44
        int(made.secret[4:], 16)  # hex, as E2B's SDK 2.45 checks
        assert keys.authenticate(made.secret).team == "blue"
        assert keys.create().key.team == "default"
    raw = (tmp_path / "keys.db").read_bytes()
    assert made.secret.encode() not in raw
    assert made.secret[4:].encode() not in raw


@pytest.mark.parametrize("given", [None, "", "e2b_" + "0" * 40, "not a key"])
def test_unknown_keys_are_refused(tmp_path: Path, given: str | None) -> None:
    with KeyStore(tmp_path / "keys.db") as keys:
        keys.create()
        with pytest.raises(Unauthenticated):
            keys.authenticate(given)


def test_revoked_keys_never_authenticate_again(tmp_path: Path) -> None:
    with KeyStore(tmp_path / "keys.db") as keys:
        made = keys.create(team="t1")
        kept = keys.create(team="t1")
        revoked = keys.revoke(made.key.id)
        assert not revoked.active
        assert keys.revoke(made.secret).revoked_at == revoked.revoked_at  # twice: unchanged
        with pytest.raises(Unauthenticated):
            keys.authenticate(made.secret)
        assert keys.authenticate(kept.secret).team == "t1"
        with pytest.raises(NotFound):
            keys.revoke("nosuchkey")
        assert [k.active for k in keys.list()] == [False, True]


@pytest.mark.parametrize("team", ["", "Upper", "a/b", "-x", "x" * 64])
def test_bad_team_names_change_nothing(tmp_path: Path, team: str) -> None:
    with KeyStore(tmp_path / "keys.db") as keys:
        with pytest.raises(InvalidArgument):
            keys.create(team=team)
        assert keys.list() == []


def test_the_keys_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENBOX_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "create", "--team", "red", "--name", "laptop", "--json"])
    assert made.exit_code == 0, made.output
    key = json.loads(made.stdout)["key"]
    listed = json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)
    assert [(k["name"], k["team"], k["revoked_at"]) for k in listed] == [("laptop", "red", None)]
    assert key not in runner.invoke(app, ["keys", "list"]).stdout
    assert runner.invoke(app, ["keys", "revoke", listed[0]["id"]]).exit_code == 0
    assert json.loads(runner.invoke(app, ["keys", "list", "--json"]).stdout)[0]["revoked_at"] is not None
    assert runner.invoke(app, ["keys", "revoke", "nosuch"]).exit_code == 4
    assert runner.invoke(app, ["keys", "create", "--team", "Bad/Team"]).exit_code == 2
    with sqlite3.connect(tmp_path / "keys.db") as db:
        assert db.execute("SELECT count(*) FROM keys").fetchone()[0] == 1
