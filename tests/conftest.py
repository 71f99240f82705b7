"""Suite-wide settings: slow end-to-end tests get a longer per-test timeout than pyproject's default."""

from __future__ import annotations

import pytest

#: Seconds a test marked slow may run (minutes-long searches on a loaded 2-core machine).
SLOW_TIMEOUT_S = 3600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
