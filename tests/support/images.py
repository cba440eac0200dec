"""The guest image for tests: built once per machine into a persistent cache dir, then reused.

``ensure_test_image()`` builds or reuses image ``minimal`` under ``WRENBOX_TEST_DATA_DIR`` (default
``/var/tmp/wrenbox-test``). The first build takes about a minute (debootstrap); later builds reuse every
cached layer and rebuild only what changed (the agent's source: a few seconds). Any test can use the
``guest_image`` fixture (defined in ``tests/conftest.py``) or call this directly.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from wrenbox import service
from wrenbox.config import Settings
from wrenbox.images import Image, ImageConfig, build_image

__all__ = [
    "TEST_DATA_DIR",
    "ensure_test_image",
    "image_config",
    "image_settings",
    "scratch_data_dir",
    "share_cache",
]

TEST_DATA_DIR = Path(os.environ.get("WRENBOX_TEST_DATA_DIR", "/var/tmp/wrenbox-test"))


def image_settings() -> Settings:
    """Settings whose data dir is the persistent test cache (images, host probe cache)."""
    return Settings(data_dir=TEST_DATA_DIR)


def image_config(**overrides: object) -> ImageConfig:
    return service.image_config(image_settings(), **overrides)


@functools.cache
def ensure_test_image(name: str = "minimal") -> Image:
    """Build (or reuse) the test image; cached for the rest of this test session."""
    return build_image(image_config(), name).image


def scratch_data_dir(prefix: str) -> Path:
    """A new data dir under /var/tmp (short: unix socket paths are limited to 108 bytes) that shares the
    cached guest image and the host probe's cache (the KVM verdict) with every other test."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    share_cache(root)
    return root


def share_cache(root: Path) -> None:
    """Make the empty data dir ``root`` use the cached guest image and host probe (built if need be)."""
    ensure_test_image()
    (root / "images").symlink_to(TEST_DATA_DIR / "images")
    # The probe's cache (the 5 s KVM verdict above all) is shared too; its files are replaced atomically.
    (TEST_DATA_DIR / "host").mkdir(exist_ok=True)
    (root / "host").symlink_to(TEST_DATA_DIR / "host")
