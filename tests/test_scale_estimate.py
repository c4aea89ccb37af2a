"""benchmarks/scale_estimate.py: the shapes it scales to are the published models, and its rules are the ones it
states (a stage's seconds scale by its own count; the measured model's row is the measurement)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import scale_estimate as se  # noqa: E402


@pytest.mark.parametrize("name,published", [("Qwen2.5-Coder-1.5B (measured)", 1.54e9 + 0.233e9),
                                            ("Qwen2.5-7B", 7.61e9), ("Qwen2.5-72B", 72.7e9)])
def test_parameter_counts_are_the_published_ones(name, published):
    """Qwen2.5's model cards: 1.54B (with a 233M untied head: 1.78B in all), 7.61B, 72.7B; norms and biases are
    the difference (< 0.5%)."""
    assert se.params(se.SHAPES[name]) == pytest.approx(published, rel=5e-3)


def test_the_measured_row_is_the_measurement_and_others_scale_by_their_count():
    stages = {k: {"seconds": 100.0, "peak_rss_bytes": 8 * 2**30} for k in se.STAGES}
    text = se.render(stages, {"date": "d", "machine": "m", "load": "l"})
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    load = rows["load (float32)"].split(" | ")
    assert load[2] == se._fmt_s(100.0) and load[3] == "8 GiB"  # the 1.5B row: as measured
    base, big = se.SHAPES["Qwen2.5-Coder-1.5B (measured)"], se.SHAPES["Qwen2.5-7B"]
    assert load[4] == se._fmt_s(100.0 * se.params(big) / se.params(base))
    assert rows["compare, 64 windows"].split(" | ")[2] == se._fmt_s(200.0)  # 32 windows measured, 64 reported
    assert "no stage fits" in text.split("**Qwen2.5-72B**")[1].splitlines()[0]
