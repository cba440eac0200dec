"""The streaming multipart parser: any split of the body into chunks yields the same parts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wrenbox.errors import InvalidArgument
from wrenbox.guest.multipart import MultipartParser, PartEnd, PartStart, boundary_of

BOUNDARY = b"----wrenbox-boundary-7MA4YWxk"


def body(parts: list[tuple[str, bytes]]) -> bytes:
    out = b"preamble to ignore\r\n"
    for filename, data in parts:
        out += b"--" + BOUNDARY + b"\r\n"
        out += f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\nepilogue"


def parse(raw: bytes, cuts: list[int]) -> list[tuple[str | None, bytes]]:
    parser = MultipartParser(BOUNDARY)
    parts: list[tuple[str | None, bytes]] = []
    positions = sorted({0, *[c % (len(raw) + 1) for c in cuts], len(raw)})
    for start, end in itertools.pairwise(positions):
        for event in parser.feed(raw[start:end]):
            if isinstance(event, PartStart):
                parts.append((event.filename, b""))
            elif isinstance(event, PartEnd):
                continue
            else:
                name, data = parts[-1]
                parts[-1] = (name, data + event)
    assert parser.done
    return parts


# Data that looks like boundaries is the hard case: CRLF, dashes, a boundary prefix.
tricky = st.lists(
    st.sampled_from([b"\r\n", b"--", b"-", BOUNDARY[:10], b"\r\n--", b"x", b"\0\xff"]), max_size=30
)


@settings(max_examples=200, deadline=None)
@given(
    datas=st.lists(tricky.map(b"".join), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_chunking_gives_the_same_parts(datas: list[bytes], cuts: list[int]) -> None:
    parts = [(f"/tmp/dir/file-{i}.bin", data) for i, data in enumerate(datas)]
    assert parse(body(parts), cuts) == parts


def test_html5_escaped_filenames() -> None:
    raw = (
        b"--"
        + BOUNDARY
        + b'\r\nContent-Disposition: form-data; name="file"; filename="/tmp/a%22b\\\\c"\r\n\r\n'
        b"x\r\n--" + BOUNDARY + b"--\r\n"
    )
    assert parse(raw, []) == [('/tmp/a"b\\c', b"x")]


def test_boundary_from_content_type() -> None:
    assert boundary_of('multipart/form-data; boundary="abc def"') == b"abc def"
    assert boundary_of("multipart/form-data; charset=utf-8; boundary=xyz") == b"xyz"
    with pytest.raises(InvalidArgument):
        boundary_of("multipart/form-data")


def test_oversized_headers_are_refused() -> None:
    parser = MultipartParser(BOUNDARY)
    with pytest.raises(InvalidArgument):
        list(parser.feed(b"--" + BOUNDARY + b"\r\nX-Junk: " + b"a" * 20_000))
