"""The trainer against a bare loop, 8-bit AdamW against AdamW, and Fashion-MNIST decisions.

All timings are ratios against a baseline measured in the same run, repeats interleaved (trainer,
bare, 8-bit, ... in turn), medians over steady-state steps (the first `--skip` steps of every run
are dropped); never absolute claims. The machine this runs on may be shared: read the ratios with
their spread.

  1. throughput: `train()` on packed Shakespeare plays (a small tokenizer trained here) against a bare
     loop over the same model (same config and seed), the same optimizer (the recipe's `adamw`, torch
     AdamW), the same batch shape and the same batches, loaded into memory beforehand: forward,
     backward, clip, step, zero_grad. Both are timed per optimizer step, the trainer from its own
     metrics.jsonl (`step_time`, `tokens_per_s`). Goal: trainer >= 0.95x the bare loop.
  2. data wait: the trainer's median and mean `data_wait` share of a step. Goal: < 2%.
  3. `adamw_8bit` against `adamw`: the trainer's median step time, and the optimizer-state bytes
     (`optimizer_state_bytes`) after one step on the `--state-preset` model. Goal: <= 0.3x the state.
  4. Fashion-MNIST (4 classes, captions that do not name the class): decision accuracy on the
     validation rows after `--mm-steps` steps (goal >= 85%) and the expected calibration error
     (15 bins), trained with calibration_loss_weight 0 and 0.2 (pipelines/demo_multimodal.py's
     `predict` and `calibration`).

    .venv/bin/python benchmarks/bench_train.py             # the full run (about 10-15 CPU minutes)
    .venv/bin/python benchmarks/bench_train.py --quick     # fewer steps and repeats (a few minutes)
    .venv/bin/python benchmarks/bench_train.py --dry-run   # every code path on tiny sizes, in seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))  # pipelines.demo_multimodal (imports pipelines.stages)

from trainer_util import pack_texts  # noqa: E402

from qovaryx_model.trainer import train  # noqa: E402
from qovaryx_model.trainer.data import BatchLoader, Sampler, resolve_data  # noqa: E402
from qovaryx_model.trainer.optim import build_optimizer, optimizer_state_bytes  # noqa: E402
from qovaryx_model.trainer.recipe import load_recipe  # noqa: E402
from qovaryx_model.trainer.setup import build_model, fresh_config, open_data  # noqa: E402

# The throughput recipe: the debug model (2 layers, d_model 64) at one fixed length, so every step
# has the same shape; no validation, one checkpoint at the end (outside the timed steps).
LM = dict(preset="debug", mtp_k=2, tokens_per_batch=2048, grad_accum_steps=1, max_seq_len=128, lr=3e-3,
          min_lr=3e-4, warmup_steps=5, optimizer="adamw", mixed_precision="bf16", num_workers=1, eval_every=0,
          eval_tokens=1024, save_every=0, keep_checkpoints=1, log_every=10)
# Fashion-MNIST rows: 28x28 greyscale, 7x7 patches (16 prefix tokens), a caption of a few tokens.
MM = dict(preset="debug", mtp_k=1, chart_patch_encoder_enabled=True, image_size=28, image_channels=1, patch_size=7,
          decision_head_enabled=True, decision_weight=1.0, max_seq_len=16, tokens_per_batch=1024,
          grad_accum_steps=1, lr=3e-3, min_lr=3e-4, warmup_steps=20, num_workers=0, eval_tokens=1024,
          save_every=0, keep_checkpoints=1)
KEEP = (0, 1, 7, 8)  # T-shirt/top, Trouser, Sneaker, Bag -> decision classes 0..3
CAPTIONS = ["A small picture.", "Look at this image.", "An item, photographed.", "What is this?"]

MODES = {  # plays, throughput steps, skip, repeats, state preset, images, mm steps
    "full": dict(plays=6, steps=40, skip=5, repeats=3, state_preset="50m", images=6000, mm_steps=600),
    "quick": dict(plays=4, steps=20, skip=4, repeats=2, state_preset="50m", images=4000, mm_steps=250),
    "dry": dict(plays=2, steps=4, skip=1, repeats=1, state_preset="debug", images=400, mm_steps=4),
}


def prepare_text(work: Path, plays: int, corpus: Path) -> Path:
    """A 2,048-token tokenizer trained on `plays` plays, and those plays packed with it."""
    from qovaryx_data import train_bpe

    files = sorted(corpus.glob("*.txt"))[:plays]
    if not files:
        raise SystemExit(f"no *.txt plays in {corpus}; pass --corpus")
    tok = work / "tok"
    train_bpe([str(p) for p in files], out=tok, vocab_size=2048)
    return pack_texts(files, tok, work / "plays", validation=0.0)


def prepare_fmnist(work: Path, images_dir: Path, n: int, tokenizer: Path) -> Path:
    """Fashion-MNIST rows of 4 classes as PNG + JSONL, packed with 20% validation rows."""
    from PIL import Image
    from fmnist import load_fashion_mnist

    from qovaryx_data import pack

    images, labels = load_fashion_mnist(images_dir, n)
    keep = np.isin(labels, KEEP) if labels.max() > 3 else np.ones(len(labels), bool)
    images, labels = images[keep], labels[keep]
    to_class = {c: i for i, c in enumerate(KEEP)} if labels.max() > 3 else {c: c for c in range(4)}
    root = work / "fmnist"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(root / "rows.jsonl", "w") as f:
        for i, (a, y) in enumerate(zip(images, labels)):
            Image.fromarray(a).save(root / "img" / f"{i:05d}.png")
            f.write(json.dumps({"text": CAPTIONS[rng.integers(4)], "image": f"img/{i:05d}.png",
                                "label": to_class[int(y)]}) + "\n")  # the caption says nothing of the label
    manifest = {"name": "fmnist4", "tokenizer": str(tokenizer), "output": str(root / "packed"), "validation": 0.2,
                "images": {"size": [28, 28], "mode": "L"},
                "sources": [{"path": str(root / "rows.jsonl"), "format": "jsonl", "image_field": "image",
                             "decision_field": "label"}]}
    (root / "m.yaml").write_text(yaml.safe_dump(manifest))
    pack(root / "m.yaml", workers=1, progress=False)
    return root / "packed"


def write(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump(keys))
    return path


def steady(rows: list[dict], skip: int, key: str) -> list[float]:
    return [r[key] for r in rows if not r.get("eval")][skip:]


def run_trainer(recipe: Path, data: Path, out: Path, steps: int, skip: int) -> dict:
    res = train(recipe, data, out=out, max_steps=steps, progress=False)
    rows = [json.loads(x) for x in res.metrics.read_text().splitlines() if x.strip()]
    st, wait = steady(rows, skip, "step_time"), steady(rows, skip, "data_wait")
    return {"step_time": statistics.median(st), "tokens_per_s": statistics.median(steady(rows, skip, "tokens_per_s")),
            "data_wait_median": statistics.median(wait), "data_wait_mean": statistics.fmean(wait)}


def run_bare(recipe_path: Path, data: Path, steps: int, skip: int) -> dict:
    """The same model (config, seed, dtype), optimizer and batches as `train()`, with nothing else:
    the batches are loaded into memory first; each step is forward, backward, clip, step, zero_grad."""
    recipe = load_recipe(recipe_path)
    rd = open_data(resolve_data(data)[0], None)
    device = torch.device("cpu")
    model = build_model(fresh_config(recipe, rd), recipe.seed, device, None, recipe.param_dtype).train()
    opt = build_optimizer(model, recipe, device)
    sampler, loader = Sampler(rd.train, rd.weights, recipe, recipe.seed), BatchLoader(rd.train, None, False)
    batches = [[loader.load(m) for m in sampler.plan_step()] for _ in range(steps)]
    times = []
    for step in batches:
        t0 = time.perf_counter()
        for b in step:
            model(**b).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    st = times[skip:]
    return {"step_time": statistics.median(st), "tokens_per_s": recipe.tokens_per_step / statistics.median(st)}


def state_bytes(preset: str, optimizer: str) -> int:
    """Optimizer-state bytes of the `preset` model after one step (random gradients: the state's
    size does not depend on their values)."""
    recipe = load_recipe(mapping={"preset": preset, "target_tokens": 4096, "tokens_per_batch": 2048,
                                  "max_seq_len": 128, "optimizer": optimizer, "mtp_k": 1})
    device = torch.device("cpu")
    model = build_model(recipe.model_config(vocab_size=2048), 0, device, None)
    opt = build_optimizer(model, recipe, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    n = optimizer_state_bytes(opt)
    del model, opt
    return n


def run_fmnist(data: Path, work: Path, steps: int, weight: float) -> dict:
    from pipelines.demo_multimodal import calibration, predict

    recipe = write(work / f"mm-{weight}.yaml", **MM, target_tokens=steps * MM["tokens_per_batch"],
                   calibration_loss_weight=weight)
    t0 = time.perf_counter()
    res = train(recipe, data, out=work / f"mm-run-{weight}", progress=False)
    seconds = time.perf_counter() - t0
    probs, labels = predict(res.checkpoint, data / "val")
    return {"accuracy": float((probs.argmax(1) == labels).mean()), "ece": calibration(probs, labels, 15)["ece"],
            "rows": len(labels), "seconds": seconds}


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3f}-{max(xs):.3f}" if len(xs) > 1 else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer steps and repeats (a few minutes)")
    g.add_argument("--dry-run", action="store_true", help="every code path on tiny sizes (seconds; no figures)")
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpora" / "shakespeare", help="folder of plays (*.txt)")
    ap.add_argument("--images-dir", type=Path, default=SHARED / "images", help="Fashion-MNIST IDX .gz files")
    ap.add_argument("--skip-fmnist", action="store_true", help="leave out the Fashion-MNIST part")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    mode = MODES["dry" if args.dry_run else "quick" if args.quick else "full"]
    warnings.filterwarnings("ignore", message=".*adamw_8bit.*")

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        data = prepare_text(work, mode["plays"], args.corpus)
        lm = write(work / "lm.yaml", **LM, target_tokens=mode["steps"] * LM["tokens_per_batch"])
        lm8 = write(work / "lm8.yaml", **{**LM, "optimizer": "adamw_8bit"},
                    target_tokens=mode["steps"] * LM["tokens_per_batch"])
        runs: dict[str, list[dict]] = {"trainer": [], "bare": [], "trainer_8bit": []}
        for r in range(mode["repeats"]):  # interleaved; the order rotates so no variant always goes first
            order = [("trainer", lm), ("bare", lm), ("trainer_8bit", lm8)]
            order = order[r % 3:] + order[:r % 3]
            for name, recipe in order:
                if name == "bare":
                    runs[name].append(run_bare(recipe, data, mode["steps"], mode["skip"]))
                else:
                    runs[name].append(run_trainer(recipe, data, work / f"{name}-{r}", mode["steps"], mode["skip"]))
        med = {k: statistics.median(x["step_time"] for x in v) for k, v in runs.items()}
        thr = [b["step_time"] / t["step_time"] for t, b in zip(runs["trainer"], runs["bare"])]
        opt8 = [e["step_time"] / t["step_time"] for t, e in zip(runs["trainer"], runs["trainer_8bit"])]
        wait_med = statistics.median(x["data_wait_median"] for x in runs["trainer"])
        wait_mean = statistics.median(x["data_wait_mean"] for x in runs["trainer"])
        sb = {o: state_bytes(mode["state_preset"], o) for o in ("adamw", "adamw_8bit")}
        mm = {}
        if not args.skip_fmnist:
            fm = prepare_fmnist(work, args.images_dir, mode["images"], work / "tok")
            mm = {w: run_fmnist(fm, work, mode["mm_steps"], w) for w in (0.0, 0.2)}

    res = {"mode": "dry" if args.dry_run else "quick" if args.quick else "full", "threads": torch.get_num_threads(),
           "step_time_median_s": med, "trainer_vs_bare": statistics.median(thr), "trainer_vs_bare_runs": thr,
           "data_wait_median": wait_med, "data_wait_mean": wait_mean,
           "adamw_8bit_vs_adamw_step_time": statistics.median(opt8), "adamw_8bit_step_time_runs": opt8,
           "state_preset": mode["state_preset"], "state_bytes": sb, "state_ratio": sb["adamw_8bit"] / sb["adamw"],
           "fmnist": {str(k): v for k, v in mm.items()}}
    goals = {"trainer tokens/s / bare loop >= 0.95": res["trainer_vs_bare"] >= 0.95,
             "data-wait share < 2%": wait_mean < 0.02,
             "adamw_8bit state / adamw state <= 0.3": res["state_ratio"] <= 0.3}
    if mm:
        goals["Fashion-MNIST accuracy >= 85% (weight 0)"] = mm[0.0]["accuracy"] >= 0.85
    print(f"bench_train ({res['mode']}; {res['threads']} threads; the machine may be shared: timings are noisy, "
          "read the ratios and their spread)")
    print(f"{'measure':<44}{'median':>10}{'spread':>14}")
    print(f"{'trainer tokens/s / bare loop':<44}{res['trainer_vs_bare']:>9.3f}x{spread(thr):>14}")
    print(f"{'trainer data-wait share (mean of steps)':<44}{100 * wait_mean:>9.2f}%{'':>14}")
    print(f"{'trainer data-wait share (median of steps)':<44}{100 * wait_med:>9.2f}%{'':>14}")
    print(f"{'adamw_8bit step time / adamw':<44}{res['adamw_8bit_vs_adamw_step_time']:>9.3f}x{spread(opt8):>14}")
    print(f"{'adamw_8bit state bytes / adamw (' + mode['state_preset'] + ')':<44}{res['state_ratio']:>9.3f}x"
          f"{sb['adamw_8bit'] / 2**20:>8.1f}/{sb['adamw'] / 2**20:.1f} MiB")
    for w, m in mm.items():
        print(f"{f'Fashion-MNIST, calibration weight {w}':<44} accuracy {100 * m['accuracy']:.1f}%, ECE(15) "
              f"{m['ece']:.4f} ({m['rows']} val rows, {mode['mm_steps']} steps, {m['seconds']:.0f}s)")
    for goal, ok in goals.items():
        print(f"  goal {goal}: {'MET' if ok else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({**res, "goals": goals}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
