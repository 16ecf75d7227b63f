"""Suite-wide collection rules.

With ``pytest -n 2 --dist loadgroup`` (the README's command) tests that start processes
(``distributed``-marked gloo runs, everything under ``tests/emit``) and the timing-sensitive
compute calibration share one worker, one at a time, while the other worker runs the rest: the
two cores stay busy and no two multi-process tests compete for them.
"""

from __future__ import annotations

import pytest

SERIAL = ("tests/emit/", "tests/cost/test_cost_compute_calibrate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if item.get_closest_marker("distributed") or path.startswith(SERIAL):
            item.add_marker(pytest.mark.xdist_group("processes"))
