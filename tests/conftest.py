"""Shared fixtures and markers. Component-specific fixtures live next to their tests.

Markers (see pyproject): ``root`` tests are skipped, with a reason naming the missing capability, when
not running as root; ``vm`` tests are skipped when QEMU is not installed; ``soak`` tests (long load, soak
and fuzz variants) run only with ``--soak``, so the default run stays well inside CI's time.
"""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="also run the long soak, load and fuzz variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    soak = config.getoption("--soak")
    not_root = os.geteuid() != 0
    no_qemu = shutil.which("qemu-system-x86_64") is None
    for item in items:
        if not_root and item.get_closest_marker("root"):
            item.add_marker(pytest.mark.skip(reason="needs root (netns, nftables, loop devices)"))
        if no_qemu and item.get_closest_marker("vm"):
            item.add_marker(pytest.mark.skip(reason="needs qemu-system-x86_64 (Debian: qemu-system-x86)"))
        if not soak and item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.skip(reason="a long variant: run with --soak"))


@pytest.fixture(scope="session")
def guest_image():  # type: ignore[no-untyped-def]
    """The guest image ``minimal`` (a ``wrenbox.images.Image``), built once per machine into
    ``WRENBOX_TEST_DATA_DIR`` and reused; see ``tests/support/images.py``."""
    if os.geteuid() != 0:
        pytest.skip("building the guest image needs root (debootstrap, chroot)")
    from tests.support.images import ensure_test_image

    return ensure_test_image()
