from __future__ import annotations

from pathlib import Path

import pytest

from wrenbox.config import load_settings
from wrenbox.errors import InvalidArgument


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("WRENBOX_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.data_dir == Path("/var/lib/wrenbox")
    assert s.images_dir == Path("/var/lib/wrenbox/images")
    assert s.state_db == Path("/var/lib/wrenbox/state.db")
    assert s.defaults.template == "minimal"


def test_env_overrides_toml_overrides_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "wrenbox.toml"
    cfg.write_text('data_dir = "/srv/a"\n[limits]\nmax_sandboxes = 5\nmax_concurrent_starts = 2\n')
    monkeypatch.setenv("WRENBOX_CONFIG", str(cfg))
    s = load_settings()
    assert s.data_dir == Path("/srv/a")
    assert s.limits.max_sandboxes == 5
    monkeypatch.setenv("WRENBOX_DATA_DIR", "/srv/b")
    monkeypatch.setenv("WRENBOX_LIMITS__MAX_SANDBOXES", "7")
    s = load_settings()
    assert s.data_dir == Path("/srv/b")
    assert s.limits.max_sandboxes == 7
    assert s.limits.max_concurrent_starts == 2
    assert load_settings(data_dir=Path("/srv/c")).data_dir == Path("/srv/c")


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENBOX_LIMITS__MAX_SANDBOXES", "0")
    with pytest.raises(InvalidArgument, match=r"limits\.max_sandboxes"):
        load_settings()


def test_unknown_keys_in_toml_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "wrenbox.toml"
    cfg.write_text("data_dri = '/typo'\n")
    monkeypatch.setenv("WRENBOX_CONFIG", str(cfg))
    with pytest.raises(InvalidArgument, match="data_dri"):
        load_settings()


def test_missing_named_config_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENBOX_CONFIG", "/nonexistent/wrenbox.toml")
    with pytest.raises(InvalidArgument, match="not a file"):
        load_settings()
