"""Synthetic price charts for the multimodal demo: random-walk series, their decision label, and
a greyscale rendering with Pillow (docs/MULTIMODAL.md, "The chart demo").

A chart is a series of `points` closing prices. Its label is computed from the series alone:

    r      = diff(log(prices))              the log returns, one per step
    trend  = log(p[-1] / p[0])              the net move over the window
    vol    = std(r)                         the per-step volatility
    abstain  if vol   >  vol_threshold      too volatile to call
    buy      if trend >  trend_threshold    a clear rise
    sell     if trend < -trend_threshold    a clear fall
    hold     otherwise                      calm and range-bound

    >>> rule = LabelRule()
    >>> rule.label(np.exp(np.linspace(0.0, 0.3, 24)))          # a steady 35% rise, no noise
    1
    >>> DECISION_NAMES[rule.label(np.full(24, 50.0))]          # flat
    'hold'

The picture has a fixed vertical scale in log price (`log_span` of log price from bottom to top,
centred on the series' mid-range, with a random offset), so a 10% move is as tall on a $3 chart
as on a $3,000 one: the price level varies over three orders of magnitude and only shows in the
text row, which never depends on the label. Style varies too: line, filled area or bars, light or
dark background, line width, distractor gridlines and pixel noise.

Rows are written as PNG files plus one JSONL source (`write_chart_source`) for a pack manifest;
`render_arrays` gives the same charts as numpy arrays for tests.
"""
from __future__ import annotations

import json
import os
import shutil
import string
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DECISION_NAMES = ["hold", "buy", "sell", "abstain"]  # class id = position (the manifest's decision_labels)
STYLES = ("line", "area", "bars")
CHARTS_FORMAT = "qovaryx-charts"
CHARTS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class LabelRule:
    """Thresholds of the decision label (see the module docstring)."""

    trend_threshold: float = 0.12  # |log(p_end / p_start)| above this is a trend (about 13%)
    vol_threshold: float = 0.035  # per-step std of log returns above this: abstain

    def __post_init__(self):
        if not self.trend_threshold > 0:
            raise ValueError(f"LabelRule.trend_threshold={self.trend_threshold!r}: use a positive log move")
        if not self.vol_threshold > 0:
            raise ValueError(f"LabelRule.vol_threshold={self.vol_threshold!r}: use a positive volatility")

    def stats(self, prices: np.ndarray) -> tuple[float, float]:
        """(trend, vol) of one series."""
        lp = np.log(np.asarray(prices, dtype=np.float64))
        return float(lp[-1] - lp[0]), float(np.diff(lp).std())

    def label(self, prices: np.ndarray) -> int:
        """Class id (index into DECISION_NAMES) of one series of positive prices."""
        prices = np.asarray(prices, dtype=np.float64)
        if prices.ndim != 1 or len(prices) < 3 or not (prices > 0).all():
            raise ValueError("a chart's series must be 1-D, at least 3 points, all prices > 0")
        trend, vol = self.stats(prices)
        if vol > self.vol_threshold:
            return 3
        if trend > self.trend_threshold:
            return 1
        if trend < -self.trend_threshold:
            return 2
        return 0


@dataclass(frozen=True)
class ChartConfig:
    """What `write_chart_source` renders."""

    n: int = 4000  # number of charts
    seed: int = 0  # everything (series, styles, text) follows from it
    points: int = 24  # closing prices per chart
    render_size: int = 64  # side of the PNG in pixels (the pack manifest resizes to the model's size)
    log_span: float = 0.9  # log-price range from the bottom to the top of the picture
    margin: float = 0.0  # drop series within this fraction of a threshold (a dead band; 0 = keep all)
    rule: LabelRule = LabelRule()

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"ChartConfig.n={self.n!r}: render at least one chart")
        if self.points < 3:
            raise ValueError(f"ChartConfig.points={self.points!r}: a series needs at least 3 points")
        if self.render_size < 8:
            raise ValueError(f"ChartConfig.render_size={self.render_size!r}: use at least 8 pixels")
        if not self.log_span > 0:
            raise ValueError(f"ChartConfig.log_span={self.log_span!r}: use a positive log-price range")
        if not 0 <= self.margin < 1:
            raise ValueError(f"ChartConfig.margin={self.margin!r}: use a fraction in [0, 1)")


def random_series(rng: np.random.Generator, points: int, rule: LabelRule) -> np.ndarray:
    """One random walk in log price: a drift and a volatility drawn so that the four classes come
    out roughly balanced, Gaussian steps, sometimes a drift change halfway."""
    t, v = rule.trend_threshold, rule.vol_threshold
    vol = v * np.exp(rng.uniform(np.log(1.3), np.log(2.2))) if rng.random() < 0.25 \
        else v * np.exp(rng.uniform(np.log(0.15), np.log(0.9)))
    target = rng.choice([-1.0, 0.0, 1.0]) * rng.uniform(1.1, 3.0) * t if rng.random() < 0.7 \
        else rng.uniform(-0.8, 0.8) * t
    steps = points - 1
    drift = np.full(steps, target / steps)
    if rng.random() < 0.3:  # a change of pace halfway: same net drift, different shape
        k = rng.integers(steps // 4, 3 * steps // 4)
        bend = rng.uniform(-1, 1) * t
        drift[:k] += bend / k
        drift[k:] -= bend / (steps - k)
    r = drift + vol * rng.standard_normal(steps)
    level = np.log(10.0) * rng.uniform(0.5, 3.5)  # price level $3 .. $3,000: invisible in the picture
    return np.exp(level + np.concatenate([[0.0], np.cumsum(r)]))


def render(prices: np.ndarray, rng: np.random.Generator, size: int, log_span: float) -> Image.Image:
    """A greyscale (L) `size`x`size` picture of the series with a randomly drawn style."""
    lp = np.log(prices)
    mid = (lp.max() + lp.min()) / 2 + rng.uniform(-0.08, 0.08) * log_span
    y = (0.5 - (lp - mid) / log_span) * (size - 1)  # fixed pixels per log unit; top = high prices
    pad = rng.uniform(0.02, 0.08) * size
    x = np.linspace(pad, size - 1 - pad, len(prices))
    dark = rng.random() < 0.5
    bg, fg = (int(rng.integers(0, 50)), int(rng.integers(190, 256))) if dark \
        else (int(rng.integers(205, 256)), int(rng.integers(0, 70)))
    img = Image.new("L", (size, size), bg)
    d = ImageDraw.Draw(img)
    grid = (bg + fg) // 2 if dark else (bg + fg * 2) // 3
    for _ in range(int(rng.integers(0, 4))):  # distractor gridlines at random heights
        gy = float(rng.uniform(0, size - 1))
        d.line([(0, gy), (size - 1, gy)], fill=int((bg * 3 + grid) // 4), width=1)
    style = STYLES[int(rng.integers(len(STYLES)))]
    width = int(rng.integers(1, 3)) * max(1, size // 48)
    pts = list(zip(x.tolist(), y.tolist()))
    if style == "line":
        d.line(pts, fill=fg, width=width, joint="curve")
    elif style == "area":
        d.polygon([(x[0], size - 1), *pts, (x[-1], size - 1)], fill=(bg + fg) // 2)
        d.line(pts, fill=fg, width=width)
    else:  # bars: one vertical tick per close, joined by a thin line
        half = max(1, int(size / len(prices) / 3))
        for xi, yi in pts:
            d.rectangle([xi - half / 2, yi - half, xi + half / 2, yi + half], fill=fg)
        d.line(pts, fill=(bg + fg) // 2, width=1)
    a = np.asarray(img, dtype=np.float32)
    a += rng.normal(0.0, rng.uniform(0, 18), a.shape)  # sensor-like noise
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")


def caption(rng: np.random.Generator, prices: np.ndarray) -> str:
    """The row's text: a ticker, a window length and the opening price (none depend on the label)."""
    ticker = "".join(rng.choice(list(string.ascii_uppercase), size=int(rng.integers(3, 5))))
    return f"{ticker}: {len(prices)} daily closes from {prices[0]:.2f}."


def _near_threshold(prices: np.ndarray, rule: LabelRule, margin: float) -> bool:
    trend, vol = rule.stats(prices)
    return (abs(vol - rule.vol_threshold) < margin * rule.vol_threshold
            or abs(abs(trend) - rule.trend_threshold) < margin * rule.trend_threshold)


def generate(cfg: ChartConfig):
    """Yield (prices, label, caption, image) for each of the cfg.n charts, deterministically."""
    rng = np.random.default_rng(cfg.seed)
    made = 0
    while made < cfg.n:
        prices = random_series(rng, cfg.points, cfg.rule)
        if cfg.margin and _near_threshold(prices, cfg.rule, cfg.margin):
            continue
        img = render(prices, rng, cfg.render_size, cfg.log_span)
        yield prices, cfg.rule.label(prices), caption(rng, prices), img
        made += 1


def render_arrays(cfg: ChartConfig, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, size, size) uint8, labels (n,) uint8 in 0..3), resized from render_size with
    Pillow's bicubic filter when `size` differs (as the packer would)."""
    size = size or cfg.render_size
    images, labels = [], []
    for _, y, _, img in generate(cfg):
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        images.append(np.asarray(img))
        labels.append(y)
    return np.stack(images), np.asarray(labels, dtype=np.uint8)


def write_chart_source(out: str | os.PathLike, cfg: ChartConfig) -> Path:
    """Render `cfg.n` charts into the folder `out`: img/NNNNN.png, rows.jsonl (one row per chart:
    `text`, `image` (path relative to the folder), `label` (a name in DECISION_NAMES)) and
    charts.json (format, version, the config, class counts). The folder appears atomically;
    one that already holds the same config is reused. Returns the rows.jsonl path."""
    out = Path(out)
    meta = {"format": CHARTS_FORMAT, "version": CHARTS_FORMAT_VERSION, "config": asdict(cfg)}
    if (out / "charts.json").exists():
        old = json.loads((out / "charts.json").read_text(encoding="utf-8"))
        if (old.get("format"), old.get("version"), old.get("config")) == (CHARTS_FORMAT, CHARTS_FORMAT_VERSION,
                                                                           meta["config"]):
            return out / "rows.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        (tmp / "img").mkdir()
        counts = [0] * len(DECISION_NAMES)
        with open(tmp / "rows.jsonl", "w", encoding="utf-8") as f:
            for i, (_, y, text, img) in enumerate(generate(cfg)):
                rel = f"img/{i:05d}.png"
                img.save(tmp / rel, format="PNG")
                f.write(json.dumps({"text": text, "image": rel, "label": DECISION_NAMES[y]}) + "\n")
                counts[y] += 1
        meta["counts"] = dict(zip(DECISION_NAMES, counts))
        (tmp / "charts.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)  # an older config's charts
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "rows.jsonl"
