"""The multimodal demo: the card's chart-patch encoder and calibrated 4-class decision head, end to
end on price charts it renders itself (no download).

    python -m pipelines.demo_multimodal [--build DIR] [--charts N] [--steps N] [--force STAGE]

Stages (each skipped when its inputs are unchanged and its outputs exist; each timed):
  1. charts     N random-walk price charts rendered with Pillow, labelled hold / buy / sell /
                abstain from the series (pipelines/charts.py; the rule is in docs/MULTIMODAL.md)
  2. tokenizer  a small byte-level BPE on the captions             (qovaryx-data train-bpe)
  3. pack       images + captions + labels through manifests/charts.yaml, 20% held out
  4. train      the patch encoder + decision head with the trainer, pipelines/recipes/charts.yaml,
                twice: calibration_loss_weight 0 and 0.2            (qovaryx-train train)
  5. evaluate   each final checkpoint loaded with AutoModelForCausalLM.from_pretrained(...,
                trust_remote_code=True) over the validation rows: accuracy, confusion matrix,
                expected calibration error (15 bins)
  6. report     BUILD/report.md with reliability.png, loss.png and charts.png beside it

BUILD defaults to build/demo-multimodal. `--force STAGE` redoes that stage and every later one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipelines.stages import StageFailed, Stages, file_key  # shared with the main demo

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "manifests" / "charts.yaml"
RECIPE = REPO / "pipelines" / "recipes" / "charts.yaml"
STAGES = ("charts", "tokenizer", "pack", "train", "evaluate", "report")
CALIBRATION = {"no-calibration": 0.0, "calibration-0.2": 0.2}  # run name -> calibration_loss_weight
ECE_BINS = 15


def say(stage: str, msg: str) -> None:
    print(f"[demo-multimodal:{stage}] {msg}", flush=True)


# --- stages -------------------------------------------------------------------------------------
def charts_stage(args) -> dict:
    from pipelines.charts import write_chart_source

    jsonl = write_chart_source(args.build / "charts", args.chart_config)
    meta = json.loads((jsonl.parent / "charts.json").read_text(encoding="utf-8"))
    say("charts", f"{args.chart_config.n:,} charts {meta['counts']} -> {jsonl.parent}")
    return {"rows": str(jsonl), "counts": meta["counts"]}


def tokenizer_stage(args, rows: str) -> dict:
    from qovaryx_data import train_bpe

    res = train_bpe([rows], out=args.build / "tokenizer", vocab_size=args.vocab_size, format="jsonl",
                    allow_smaller_vocab=True, force=True)
    say("tokenizer", f"{res.vocab_size:,}-token byte-level BPE on the captions -> {args.build / 'tokenizer'}")
    return {"vocab_size": res.vocab_size}


def load_demo_manifest(build: Path):
    """manifests/charts.yaml with its tokenizer, source and output moved under `build`."""
    from qovaryx_data.manifest import load_manifest

    m = load_manifest(MANIFEST)
    src = dataclasses.replace(m.sources[0], path=str(build / "charts" / "rows.jsonl"))
    return dataclasses.replace(m, tokenizer=str(build / "tokenizer"), output=str(build / "packed"), sources=(src,))


def pack_stage(args) -> dict:
    from qovaryx_data import PackedDataset, pack, verify

    res = pack(load_demo_manifest(args.build), workers=args.workers, progress=False)
    bad = verify(res.out)
    if bad.bad:
        raise RuntimeError(f"verify failed: {bad.bad}")
    out = {}
    for split in ("train", "val"):
        ds = PackedDataset(res.out / split)
        labels = [ds[int(i)].decision for i in ds.multimodal_doc_indices]
        out[split] = {"rows": len(ds), "tokens": ds.num_tokens,
                      "counts": np.bincount(labels, minlength=4).tolist(), "image_shape": list(ds.image_shape)}
        say("pack", f"  {split}: {len(ds):,} charts, {ds.num_tokens:,} tokens, images {ds.image_shape}")
    return out


def train_stage(args, name: str, weight: float) -> dict:
    from qovaryx_model.trainer import load_recipe, train

    overrides = {"calibration_loss_weight": weight}
    recipe = load_recipe(RECIPE, overrides)
    if args.steps:  # a shorter (or longer) run: the schedule spans it, warmup at most a tenth of it
        overrides["target_tokens"] = args.steps * recipe.tokens_per_step
        overrides["warmup_steps"] = min(recipe.warmup_steps, max(1, args.steps // 10))
    say("train", f"{name}: calibration_loss_weight {weight}, {RECIPE.relative_to(REPO)}")
    run = args.build / "runs" / name
    if run.exists():
        shutil.rmtree(run)  # an interrupted or outdated run: this stage trains from the start
    res = train(RECIPE, args.build / "packed", out=run, overrides=overrides,
                progress=sys.stderr.isatty())
    if res.stopped_by_signal:  # SIGTERM: the trainer saved where it was; that is not a finished run
        raise RuntimeError(f"stopped by a signal at step {res.step}; run the demo again to train from the start")
    last = [json.loads(line) for line in res.metrics.read_text(encoding="utf-8").splitlines()]
    steps = [r for r in last if not r.get("eval")]
    say("train", f"{name}: {res.step} steps in {res.seconds:.1f}s ({res.tokens_per_s:,.0f} tokens/s), final "
                 f"decision loss {steps[-1].get('decision_loss', float('nan')):.3f}")
    return {"checkpoint": str(res.checkpoint), "metrics": str(res.metrics), "steps": res.step,
            "seconds": res.seconds, "tokens_per_s": res.tokens_per_s, "calibration_loss_weight": weight}


def predict(checkpoint: Path, val: Path, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(probs (n, 4), labels (n,)) of the model in `checkpoint` over every labelled row of `val`,
    loaded the way a user would: AutoModelForCausalLM with trust_remote_code."""
    import torch
    from transformers import AutoModelForCausalLM

    from qovaryx_data import PackedDataset
    from qovaryx_data.collate import collate, row_example

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    ds = PackedDataset(val, tokenizer=checkpoint)
    rows = ds.multimodal_doc_indices
    probs, labels = [], []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([row_example(ds, int(r)) for r in rows[i:i + batch_size]])
            y = batch.pop("decision_labels")
            batch.pop("labels")
            out = model(**batch)
            probs.append(out.decision_probs.numpy())
            labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error over `bins` equal-width confidence bins (Guo et al. 2017):
    ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|, confidence = the top class probability.

        >>> p = np.array([[0.9, 0.1, 0, 0], [0.6, 0.4, 0, 0]]); round(calibration(p, np.array([0, 1]), 10)["ece"], 3)
        0.35
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)  # bin b holds (edges[b], edges[b+1]]
    count = np.bincount(idx, minlength=bins)
    acc = np.bincount(idx, weights=correct, minlength=bins) / np.maximum(count, 1)
    mean_conf = np.bincount(idx, weights=conf, minlength=bins) / np.maximum(count, 1)
    ece = float((count / len(labels) * np.abs(acc - mean_conf)).sum())
    return {"ece": ece, "bins": bins, "count": count.tolist(), "accuracy": acc.tolist(),
            "confidence": mean_conf.tolist()}


def evaluate_stage(args, name: str, checkpoint: str) -> dict:
    probs, labels = predict(Path(checkpoint), args.build / "packed" / "val")
    pred = probs.argmax(1)
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (labels, pred), 1)
    cal = calibration(probs, labels)
    majority = int(np.bincount(labels, minlength=4).argmax())
    res = {"rows": len(labels), "accuracy": float((pred == labels).mean()),
           "majority_class": majority, "majority_accuracy": float((labels == majority).mean()),
           "confusion": confusion.tolist(), "nll": float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()),
           "mean_confidence": float(probs.max(1).mean()), "calibration": cal,
           "examples": {"pred": pred[:24].tolist(), "label": labels[:24].tolist()}}
    say("evaluate", f"{name}: accuracy {res['accuracy']:.1%} on {len(labels):,} validation charts "
                    f"(majority class {res['majority_accuracy']:.1%}), ECE {cal['ece']:.3f}")
    return res


def main(argv: list[str] | None = None) -> int:
    from pipelines.charts import ChartConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", type=Path, default=REPO / "build" / "demo-multimodal", help="output folder")
    p.add_argument("--charts", type=int, default=16000, help="charts to render (default 16,000; 20%% validation)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per training (default: the recipe's)")
    p.add_argument("--vocab-size", type=int, default=512, help="caption tokenizer size (default 512)")
    p.add_argument("--workers", type=int, default=None, help="pack worker processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the charts")
    p.add_argument("--margin", type=float, default=0.15,
                   help="dead band: leave out series within this fraction of a label threshold (default 0.15)")
    p.add_argument("--force", choices=STAGES, help="redo this stage and every later one")
    args = p.parse_args(argv)
    if args.charts < 20 or (args.steps is not None and args.steps < 1):
        p.error("--charts must be at least 20 and --steps positive")
    if not 0 <= args.margin < 1:
        p.error("--margin must be a fraction in [0, 1)")
    args.build = args.build.resolve()
    args.build.mkdir(parents=True, exist_ok=True)
    args.chart_config = ChartConfig(n=args.charts, seed=args.seed, margin=args.margin)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" / "Writing model shards" bars between our lines
    from pipelines.multimodal_report import write_report

    st = Stages(args.build, args.force, STAGES, "demo-multimodal")
    t0 = time.perf_counter()
    try:
        k_charts = st.key("charts", dataclasses.asdict(args.chart_config), file_key(REPO / "pipelines" / "charts.py"))
        charts = st.run("charts", k_charts, [args.build / "charts" / "rows.jsonl"], lambda: charts_stage(args))
        k_tok = st.key("tokenizer", k_charts, args.vocab_size)
        st.run("tokenizer", k_tok, [args.build / "tokenizer" / "tokenizer.json"],
               lambda: tokenizer_stage(args, charts["rows"]))
        k_pack = st.key("pack", k_tok, file_key(MANIFEST))
        packed = st.run("pack", k_pack, [args.build / "packed" / "val" / "dataset.json"], lambda: pack_stage(args))
        runs, evals = {}, {}
        for name, w in CALIBRATION.items():
            k_train = st.key("train", k_pack, file_key(RECIPE), w, args.steps)
            runs[name] = st.run(f"train ({name})", k_train, [args.build / "runs" / name / "checkpoints" / "latest"],
                                lambda: train_stage(args, name, w), stage="train")
            evals[name] = st.run(f"evaluate ({name})", st.key("evaluate", k_train, ECE_BINS), [],
                                 lambda: evaluate_stage(args, name, runs[name]["checkpoint"]), stage="evaluate")
        report = st.run("report", st.key("report", time.time()), [],
                        lambda: write_report(args.build, charts, packed, runs, evals, st.seconds,
                                             time.perf_counter() - t0, args))
    except StageFailed as e:
        print(f"error: {e}\n(the stages before it are done and kept; fix the cause and run again)", file=sys.stderr)
        return 2
    say("done", f"{time.perf_counter() - t0:.1f}s; the report is {report['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
