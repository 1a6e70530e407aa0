"""A bounded soak on loopback: mixed requests (turns, streams, drops, hostile ones) and not one 5xx.

The figure for issue 14 (500 requests) comes from ``python -m benchmarks.serve --soak 500``; the suite runs a
shorter soak of the same mix.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.allow_hosts(["127.0.0.1"]), pytest.mark.timeout(300)]


def test_a_soak_of_mixed_requests_gives_no_server_error() -> None:
    from benchmarks.serve import soak

    result = soak(120, clients=6, seed=1)
    assert result["server_errors_5xx"] == 0, result["by_kind"]
    assert result["health_after"] == "ok" and result["integrity"] == "ok"
    kinds = {k.split(":")[0] for k in result["by_kind"]}
    assert kinds >= {"turn", "stream", "drop", "hostile", "history", "conversations"}
    assert result["by_class"].get("2xx", 0) > 50
