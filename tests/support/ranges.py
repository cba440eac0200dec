"""Address ranges for test data dirs that run whole sandboxes.

Each suite that opens a host (sandbox, crash, api) takes its own pair of /16s. ``WRENBOX_TEST_NET`` (a small
integer, default 0) moves every pair by 20 in the second octet, so two checkouts can run their suites at the
same time on one machine without their slots' addresses meeting.
"""

from __future__ import annotations

import os

__all__ = ["suite_ranges"]

_SHIFT = 20 * int(os.environ.get("WRENBOX_TEST_NET", "0"))


def suite_ranges(second_octet: int) -> dict[str, str]:
    """``host_range`` and ``transfer_range`` for the suite whose host range is ``10.<second_octet>/16``."""
    a = second_octet + _SHIFT
    return {"host_range": f"10.{a}.0.0/16", "transfer_range": f"10.{a + 1}.0.0/16"}
