from __future__ import annotations

import pytest

from wrenbox import errors


def test_every_error_has_a_code_and_an_http_status() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, errors.WrenboxError):
            assert cls.code
            assert isinstance(cls.code, str)
            assert 400 <= cls.http_status <= 599


@pytest.mark.parametrize(
    ("code", "cls", "status"),
    [
        ("not_found", errors.NotFound, 404),
        ("invalid_argument", errors.InvalidArgument, 400),
        ("already_exists", errors.AlreadyExists, 409),
        ("failed_precondition", errors.Conflict, 409),
        ("unauthenticated", errors.Unauthenticated, 401),
        ("permission_denied", errors.PermissionDenied, 403),
        ("unavailable", errors.Unavailable, 503),
        ("resource_exhausted", errors.Unavailable, 503),
        ("deadline_exceeded", errors.Timeout, 504),
        ("data_loss", errors.CorruptData, 500),
        ("something_new", errors.WrenboxError, 500),
    ],
)
def test_error_for_code_maps_connect_codes(code: str, cls: type, status: int) -> None:
    err = errors.error_for_code(code, "boom")
    assert type(err) is cls
    assert err.http_status == status
    assert err.message == "boom"


def test_subclasses_share_the_parent_status() -> None:
    assert issubclass(errors.NotRunning, errors.Conflict)
    assert errors.NotRunning("x").http_status == 409
    assert errors.MissingTool("nft", "nftables").http_status == 501


def test_missing_tool_names_the_package() -> None:
    err = errors.MissingTool("debootstrap", "debootstrap")
    assert "debootstrap" in str(err)
    assert err.to_dict() == {"code": "unimplemented", "message": str(err)}


def test_command_failed_message_has_argv_status_and_stderr() -> None:
    err = errors.CommandFailed(["losetup", "-d", "/dev/loop9"], 1, "no such device\n")
    assert "losetup -d /dev/loop9" in str(err)
    assert "exited 1" in str(err)
    assert "no such device" in str(err)
