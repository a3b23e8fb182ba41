"""pipelines/charts.py: the decision label follows the documented rule, the renderer is
deterministic and shows what the label depends on, and the source packs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.charts import DECISION_NAMES, ChartConfig, LabelRule, generate, render_arrays, write_chart_source


def _series(trend: float, vol: float, n: int = 24, seed: int = 0) -> np.ndarray:
    """Prices whose realized log trend and per-step volatility are exactly `trend` and `vol`."""
    z = np.random.default_rng(seed).standard_normal(n - 1)
    z = (z - z.mean()) / z.std() * vol
    return 100 * np.exp(np.concatenate([[0.0], np.cumsum(z + trend / (n - 1))]))


@pytest.mark.parametrize("trend,vol,name", [(0.3, 0.01, "buy"), (-0.3, 0.01, "sell"), (0.05, 0.01, "hold"),
                                            (-0.11, 0.034, "hold"), (0.3, 0.05, "abstain"), (0.0, 0.036, "abstain"),
                                            (0.13, 0.0, "buy"), (-0.13, 0.0, "sell")])
def test_label_rule_known_answers(trend, vol, name):
    rule = LabelRule()
    p = _series(trend, vol)
    t, v = rule.stats(p)
    assert abs(t - trend) < 1e-9 and abs(v - vol) < 1e-9
    assert DECISION_NAMES[rule.label(p)] == name
    assert rule.label(p * 1000) == rule.label(p)  # the price level does not matter


def test_label_rule_refuses_bad_series_and_thresholds():
    with pytest.raises(ValueError, match="prices > 0"):
        LabelRule().label(np.array([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="trend_threshold"):
        LabelRule(trend_threshold=0)
    with pytest.raises(ValueError, match="margin"):
        ChartConfig(margin=1.0)


def test_charts_are_deterministic_balanced_and_captions_hide_the_label():
    cfg = ChartConfig(n=400, seed=3)
    a, ya = render_arrays(cfg, 32)
    b, yb = render_arrays(cfg, 32)
    assert a.shape == (400, 32, 32) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    counts = np.bincount(ya, minlength=4)
    assert counts.min() > 0.1 * len(ya), counts           # no class is rare
    rows = list(generate(cfg))
    for prices, y, text, _ in rows:
        assert y == cfg.rule.label(prices)
        assert f"from {prices[0]:.2f}" in text and not any(n in text.lower() for n in DECISION_NAMES)
    # the caption's only number that varies, the opening price, carries no label information
    opening = np.log([r[0][0] for r in rows])
    means = [opening[ya == c].mean() for c in range(4)]
    assert max(means) - min(means) < 0.5 * opening.std(), means


def test_the_picture_shows_the_trend():
    """A rising chart's ink sits lower on the left than on the right (fixed log-price scale)."""
    rng = np.random.default_rng(0)
    from pipelines.charts import render

    up = np.asarray(render(_series(0.4, 0.0), rng, 64, 0.9), dtype=np.float64)
    down = np.asarray(render(_series(-0.4, 0.0), rng, 64, 0.9), dtype=np.float64)

    def ink_row(a, cols):  # mean row of the pixels furthest from the background, in some columns
        part = a[:, cols]
        ink = (np.abs(part - np.median(a)) > 60).astype(np.float64)  # above the pixel noise and gridlines
        rows = np.arange(a.shape[0])[:, None].repeat(part.shape[1], 1)
        return (rows * ink).sum() / ink.sum()

    for a, sign in ((up, 1), (down, -1)):
        assert sign * (ink_row(a, slice(4, 14)) - ink_row(a, slice(50, 60))) > 5


def test_write_chart_source_reuses_an_identical_folder(tmp_path):
    cfg = ChartConfig(n=30, seed=1)
    rows = write_chart_source(tmp_path / "c", cfg)
    lines = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 30 and all((tmp_path / "c" / r["image"]).is_file() for r in lines)
    assert {r["label"] for r in lines} <= set(DECISION_NAMES)
    meta = json.loads((tmp_path / "c" / "charts.json").read_text())
    assert meta["format"] == "qovaryx-charts" and sum(meta["counts"].values()) == 30
    mtime = rows.stat().st_mtime_ns
    assert write_chart_source(tmp_path / "c", cfg) == rows and rows.stat().st_mtime_ns == mtime
    write_chart_source(tmp_path / "c", ChartConfig(n=31, seed=1))           # another config: re-rendered
    assert len(rows.read_text().splitlines()) == 31
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left
