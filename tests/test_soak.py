"""A short, bounded soak of the real server process (bench/soak.py; the long run is the bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from soak import run  # noqa: E402

# Bounds: what a leak or a stuck generation would break. Measured on the tiny model: see docs/testing.md.
MAX_RSS_GROWTH_MIB = 150


@pytest.mark.slow
def test_a_short_soak_gives_no_5xx_no_stuck_generation_and_bounded_memory(tiny_mistral):
    report = run(str(tiny_mistral), requests=200, clients=16, max_tokens=8, overrides=["model.device=cpu"])
    assert report["requests"] == 200 and report["by_kind"] == {"plain": 120, "stream": 40, "malformed": 40}
    assert report["server_errors_5xx"] == 0, report
    assert report["in_flight_after"] == 0, report  # every disconnected stream was cancelled
    assert set(report["by_status"]) <= {"200", "400", "404", "422", "429"}, report
    assert report["by_status"].get("400", 0) + report["by_status"].get("422", 0) == 40  # every malformed one
    assert report["rss_end_mib"] - report["rss_start_mib"] < MAX_RSS_GROWTH_MIB, report
    assert report["server_exit_code"] == 0
