from __future__ import annotations

import pytest

from wrenbox.errors import InvalidArgument
from wrenbox.names import new_sandbox_id, validate_name, validate_sandbox_id


@pytest.mark.parametrize("name", ["minimal", "a", "py3.11_base-v2", "A" * 64, "9lives"])
def test_safe_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../etc", "a/b", "-rf", ".hidden", "A" * 65, "a b", "a\x00b", "naïve", None, 7],
)
def test_unsafe_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidArgument, match="invalid template"):
        validate_name(name, what="template")


def test_new_sandbox_ids_are_valid_and_distinct() -> None:
    ids = {new_sandbox_id() for _ in range(1000)}
    assert len(ids) == 1000
    for sid in ids:
        assert validate_sandbox_id(sid) == sid


@pytest.mark.parametrize("sid", ["", "abc", "ABCDEFGH", "sb-1234", "../../x", "a" * 41, "abcd\n"])
def test_bad_sandbox_ids_are_refused(sid: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_sandbox_id(sid)
