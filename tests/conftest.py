"""Suite-wide collection rules.

With ``pytest -n 2 --dist loadgroup`` (the README's command) tests that start processes
(``distributed``-marked gloo runs, everything under ``tests/emit``) share one worker, one at a
time, while the other worker runs the rest: the two cores stay busy and no two multi-process
tests compete for them. Tests marked ``timing`` measure this CPU and are left to a second,
serial run (``-m timing``) on an idle machine.
"""

from __future__ import annotations

import pytest

SERIAL = ("tests/emit/",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = item.nodeid.replace("\\", "/")
        if item.get_closest_marker("distributed") or path.startswith(SERIAL):
            item.add_marker(pytest.mark.xdist_group("processes"))
