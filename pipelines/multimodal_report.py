"""The multimodal demo's report: BUILD/report.md with its figures beside it (reliability.png,
loss.png, charts.png). Figures use matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

NAMES = ["hold", "buy", "sell", "abstain"]  # pipelines/charts.py DECISION_NAMES



def _dead_band(cfg, side: int) -> str:
    """One sentence on ChartConfig.margin: what was left out and why (sub-pixel at the packed size)."""
    if not cfg.margin:
        return "Every drawn series is kept (no dead band around the thresholds)."
    r = cfg.rule
    px = (side - 1) / cfg.log_span  # pixels per unit of log price at the packed size
    move, zigzag = r.trend_threshold * cfg.margin * px, r.vol_threshold * cfg.margin * px
    why = ("below one pixel, so no reader of the picture could call those charts"
           if max(move, zigzag) < 1 else "a band a reader of the picture could barely resolve")
    return (f"Series within {cfg.margin:.0%} of a threshold are drawn again (a dead band: |trend| within "
            f"{r.trend_threshold * (1 - cfg.margin):.3f}..{r.trend_threshold * (1 + cfg.margin):.3f}, or vol within "
            f"{r.vol_threshold * (1 - cfg.margin):.4f}..{r.vol_threshold * (1 + cfg.margin):.4f}): at {side}x{side} the band is "
            f"{move:.2f} px of net move and {zigzag:.2f} px of zigzag on either side, {why}. "
            "`--margin 0` keeps them.")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability_png(evals: dict, out: Path) -> Path:
    """One reliability diagram per run: accuracy per confidence bin against the diagonal, bar width
    = bin, the gap to the diagonal shaded, and a histogram of how many charts fall in each bin."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(evals), figsize=(5 * len(evals), 5), squeeze=False)
    for ax, (name, ev) in zip(axes[0], evals.items()):
        cal = ev["calibration"]
        b = cal["bins"]
        edges = np.linspace(0, 1, b + 1)
        centers = (edges[:-1] + edges[1:]) / 2
        count = np.array(cal["count"])
        has = count > 0
        acc, conf = np.array(cal["accuracy"]), np.array(cal["confidence"])
        ax.bar(centers[has], acc[has], width=1 / b, edgecolor="black", color="#4c72b0", label="accuracy")
        ax.bar(centers[has], (conf - acc)[has], bottom=acc[has], width=1 / b, color="#dd8452", alpha=0.5,
               edgecolor="#dd8452", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax2 = ax.twinx()
        ax2.plot(centers[has], count[has] / count.sum(), "o-", color="grey", ms=3, lw=1)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("share of charts in the bin", color="grey")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name}: ECE {cal['ece']:.3f}, accuracy {ev['accuracy']:.1%}")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def loss_png(runs: dict, out: Path) -> Path:
    """Decision loss per step of each run (from the trainer's metrics.jsonl)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in runs.items():
        rows = [json.loads(line) for line in Path(run["metrics"]).read_text(encoding="utf-8").splitlines()]
        rows = [r for r in rows if not r.get("eval") and "decision_loss" in r]
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["decision_loss"] for r in rows])
        k = max(1, len(loss) // 40)  # a running mean over about 2.5% of the run
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps, loss, alpha=0.25)
        ax.plot(steps[k - 1:], smooth, label=f"{name} (calibration_loss_weight {run['calibration_loss_weight']})",
                color=ax.lines[-1].get_color())
    ax.axhline(np.log(4), color="grey", ls=":", lw=1, label="ln 4 (uniform guess)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("decision loss (CE + calibration term)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def charts_png(val: Path, ev: dict, out: Path) -> Path:
    """The first 24 validation charts as packed (32x32), each captioned `label -> prediction`."""
    from qovaryx_data import PackedDataset
    from qovaryx_data.images import contact_sheet

    ds = PackedDataset(val)
    rows = ds.multimodal_doc_indices[:len(ev["examples"]["label"])]
    images = [ds[int(r)].image for r in rows]
    tags = [f"{NAMES[y]}>{NAMES[p]}" if p != y else NAMES[y]
            for y, p in zip(ev["examples"]["label"], ev["examples"]["pred"])]
    return contact_sheet(images, tags, out, cell=96, columns=8)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(build: Path, charts: dict, packed: dict, runs: dict, evals: dict, seconds: dict,
                 total: float, args) -> dict:
    from qovaryx_data.fileio import atomic_write

    rel = reliability_png(evals, build / "reliability.png")
    loss = loss_png(runs, build / "loss.png")
    first = next(iter(evals))
    sheet = charts_png(build / "packed" / "val", evals[first], build / "charts.png")
    rule = args.chart_config.rule
    ev0 = evals[first]
    goal = "reached" if max(e["accuracy"] for e in evals.values()) >= 0.85 else "NOT reached"
    cmp_rows = [[name, f"{runs[name]['calibration_loss_weight']}", f"**{e['accuracy']:.1%}**",
                 f"{e['majority_accuracy']:.1%} ({NAMES[e['majority_class']]})", f"{e['calibration']['ece']:.4f}",
                 f"{e['nll']:.3f}", f"{e['mean_confidence']:.3f}", runs[name]["steps"], f"{runs[name]['seconds']:.0f}s"]
                for name, e in evals.items()]
    conf_tables = []
    for name, e in evals.items():
        m = np.array(e["confusion"])
        rows = [[f"**{NAMES[i]}**", *m[i].tolist(), f"{m[i, i] / max(m[i].sum(), 1):.0%}"] for i in range(4)]
        conf_tables.append(f"{name} (rows: true label, columns: prediction; last column: recall)\n\n"
                           + _table(["true \\ predicted", *NAMES, "recall"], rows))
    time_rows = [[s, f"{t:.1f}s", "skipped (up to date; time when built)" if skipped else "ran"]
                 for s, (t, skipped) in seconds.items()]
    split_rows = [[split, f"{d['rows']:,}", f"{d['tokens']:,}", " / ".join(map(str, d["counts"])),
                   "x".join(map(str, d["image_shape"]))] for split, d in packed.items()]
    ckpt = runs[first]["checkpoint"]
    mc = json.loads((Path(ckpt) / "config.json").read_text(encoding="utf-8"))
    side, patch = mc["image_size"], mc["patch_size"]
    n_prefix = (side // patch) ** 2
    text = f"""# Multimodal demo: the chart-patch encoder and the calibrated decision head

Validation accuracy **{ev0['accuracy']:.1%}** against a majority-class baseline of
{ev0['majority_accuracy']:.1%} (goal >= 85%: {goal}); {len(evals)} trainings, {total:.0f}s for this
run of the demo (stage times below).

The model sees a {side}x{side} greyscale chart as {n_prefix} prefix tokens ({patch}x{patch} patches, the strided-Conv2d patch encoder) and a
caption that never depends on the label ("ABCD: 24 daily closes from 412.50."), and the decision
head reads the hidden state at the caption's last token. So everything it gets right, it read
from the pixels.

## Task

{args.chart_config.n:,} random-walk price charts of {args.chart_config.points} closes each
(`pipelines/charts.py`, seed {args.chart_config.seed}), rendered at {args.chart_config.render_size}x{args.chart_config.render_size} with
random style (line / area / bars, light or dark, line width, gridlines, pixel noise) and packed
at 32x32 through `manifests/charts.yaml`. Label, from the series (trend = log(last / first),
vol = std of the log returns):

| label | rule |
|---|---|
| abstain | vol > {rule.vol_threshold} (too volatile to call) |
| buy | otherwise, trend > +{rule.trend_threshold} |
| sell | otherwise, trend < -{rule.trend_threshold} |
| hold | otherwise |

{_dead_band(args.chart_config, side)}

{_table(["split", "charts", "tokens", "hold / buy / sell / abstain", "image (HxWxC)"], split_rows)}

![validation charts: label, or label>prediction where the model is wrong](charts.png)

## Results

Each final checkpoint loaded with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`
and run over every validation chart. ECE: expected calibration error over {ev0['calibration']['bins']}
equal-width bins of the top-class probability (0 = perfectly calibrated).

{_table(["run", "calibration_loss_weight", "accuracy", "majority baseline", "ECE", "NLL", "mean confidence", "steps", "train time"], cmp_rows)}

![reliability diagrams](reliability.png)

![decision loss while training](loss.png)

### Confusion matrices

""" + "\n\n".join(conf_tables) + f"""

## Stage times

{_table(["stage", "time", ""], time_rows)}

## Reproduce and use

```bash
make demo-multimodal                      # = python -m pipelines.demo_multimodal
python -m pipelines.demo_multimodal --charts 32000 --steps 2400   # a bigger run (stages redo as needed)
qovaryx-train train --recipe pipelines/recipes/charts.yaml --data {build / 'packed'} \\
    --out {build / 'runs' / 'mine'} --set calibration_loss_weight=0.2
```

```python
import torch
from transformers import AutoModelForCausalLM
from qovaryx_data import PackedDataset
from qovaryx_data.collate import collate, row_example

model = AutoModelForCausalLM.from_pretrained("{ckpt}", trust_remote_code=True).eval()
ds = PackedDataset("{build / 'packed' / 'val'}")
batch = collate([row_example(ds, i) for i in range(8)])
batch.pop("decision_labels"); batch.pop("labels")
with torch.no_grad():
    probs = model(**batch).decision_probs      # (8, 4): hold, buy, sell, abstain
```
"""
    report = build / "report.md"
    atomic_write(report, text)
    atomic_write(build / "results.json", json.dumps({"runs": runs, "evals": evals, "seconds": seconds}, indent=1))
    return {"report": str(report), "figures": [str(rel), str(loss), str(sheet)]}
