"""Helpers for the trainer tests: pack a few real plays, write recipes, read metrics."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "pipelines" / "recipes"

# A recipe small enough for a test: the debug model, a few steps of 2 x 1,024 tokens.
TINY = dict(preset="debug", mtp_k=2, target_tokens=8 * 2048, tokens_per_batch=1024, grad_accum_steps=2,
            max_seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=2, num_workers=0, eval_tokens=2048)


def pack_texts(files: list[Path], tokenizer: Path, out: Path, *, name: str = "plays", validation: float = 0.0,
               extra: dict | None = None) -> Path:
    """Pack `files` (one document per file) with `tokenizer` into `out`; returns the pack output folder."""
    from qovaryx_data import pack

    manifest = {"name": name, "tokenizer": str(tokenizer), "output": str(out), "validation": validation,
                "sources": [{"path": str(f), "format": "text", "split": "file"} for f in files], **(extra or {})}
    m = out.parent / f"{out.name}.yaml"
    m.write_text(yaml.safe_dump(manifest))
    pack(m, workers=1, progress=False)
    return out


def pack_sources(folder: Path, tokenizer: Path, sources: list[dict], **extra) -> Path:
    """Pack a manifest of `sources` (+ manifest keys) written to folder/pack.yaml; returns folder/out."""
    from qovaryx_data.packer import pack

    m = {"name": folder.name, "tokenizer": str(tokenizer), "output": "out", "sources": sources, **extra}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.yaml").write_text(yaml.safe_dump(m), encoding="utf-8")
    pack(folder / "pack.yaml", workers=1, progress=False)
    return folder / "out"


def write_recipe(path: Path, **keys) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **keys}))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def steps(run: Path) -> list[dict]:
    return [r for r in metrics(run) if not r.get("eval")]


def step_grads(model, batches: list[dict], counts: dict | None) -> tuple[dict, float]:
    """Gradients and summed loss of one optimizer step over `batches` with the step-wide `counts`
    (None: each micro-batch normalised on its own), as the trainer's loop computes them."""
    model.zero_grad()
    total = 0.0
    for b in batches:
        out = model(**b, num_items_in_batch=counts)
        out.loss.backward()
        total += out.loss.item()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, total


def step_counts(model, batches: list[dict]) -> dict:
    """Every loss term's target count summed over the micro-batches (the loop's step-wide counts)."""
    counts: dict = {}
    for b in batches:
        for k, v in model.loss_counts(**b).items():
            counts[k] = counts.get(k, 0) + v
    return counts
