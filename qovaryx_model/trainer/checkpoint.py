"""Checkpoints: a transformers-loadable model folder plus the training state, written atomically.

    out/checkpoints/step-00000100/
        config.json, model.safetensors, modeling source, tokenizer files   (export_pretrained)
        trainer_state.pt     optimizer, schedule, sampler, RNG states: tensors and plain Python
                             values only, read with torch.load(weights_only=True)
        trainer_state.json   format + version, step, tokens, recipe, code version, fingerprints
    out/checkpoints/latest   the name of the newest complete checkpoint (written last)

A checkpoint folder appears under its final name only when complete (built in a temp folder and
renamed); `latest` is replaced atomically after it. The newest `keep_checkpoints` are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .recipe import TrainerError

STATE_FORMAT, STATE_VERSION = "qovaryx-trainer-state", 1
LATEST = "latest"


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": _np_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _np_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_rng_state(st: dict) -> None:
    v, state, gauss = st["python"]
    random.setstate((v, tuple(state), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out: Path, step: int, model, tokenizer_dir: Path, state: dict, meta: dict,
                    keep: int) -> Path:
    """Write out/checkpoints/step-XXXXXXXX (model folder + training state), point `latest` at it, and
    delete all but the newest `keep`. Returns the checkpoint folder."""
    from ..hf import export_pretrained

    root = checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        folder = tmp / name
        export_pretrained(model, folder, tokenizer=tokenizer_dir)
        torch.save(state, folder / "trainer_state.pt")
        (folder / "trainer_state.json").write_text(json.dumps(
            {"format": STATE_FORMAT, "format_version": STATE_VERSION, **meta}, indent=2, default=str) + "\n")
        if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(folder, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_atomic(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    root = checkpoint_dir(out)
    p = root / LATEST
    if not p.is_file():
        return None
    folder = root / p.read_text().strip()
    if not (folder / "trainer_state.json").is_file():
        raise TrainerError(f"{p} names {folder.name}, which is not a complete checkpoint; remove {p} to "
                           "start over, or point it at a complete step-* folder")
    return folder


def read_meta(folder: Path) -> dict:
    p = Path(folder) / "trainer_state.json"
    meta = json.loads(p.read_text())
    if meta.get("format") != STATE_FORMAT or int(meta.get("format_version", -1)) != STATE_VERSION:
        raise TrainerError(f"{p}: format {meta.get('format')!r} version {meta.get('format_version')!r}; "
                           f"this trainer reads {STATE_FORMAT!r} version {STATE_VERSION}")
    return meta


def load_state(folder: Path) -> dict:
    return torch.load(Path(folder) / "trainer_state.pt", weights_only=True, map_location="cpu")


def load_model_weights(model, folder: Path) -> None:
    """Load model.safetensors of an exported folder into `model` (freshly built with the same config):
    every key must match, except the head when it is tied to the embedding."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise TrainerError(f"{folder}: no model.safetensors; give a `qovaryx-train init` folder or a checkpoint")
    sd = load_file(str(path))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if unexpected or set(missing) - tied:
        raise TrainerError(f"{path}: weights do not fit this model (missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}); the folder was made for another config")
    if tied:
        model.tie_weights()


def compare_meta(meta: dict, now: dict, folder: Path) -> None:
    """Refuse a resume whose data, tokenizer or math-defining recipe keys differ from the checkpoint's."""
    diffs = []
    for key in ("tokenizer_hash", "datasets"):
        if meta.get(key) != now.get(key):
            diffs.append(f"{key}: checkpoint {meta.get(key)!r}, now {now.get(key)!r}")
    old, new = meta.get("recipe_math", {}), now.get("recipe_math", {})
    for k in sorted(set(old) | set(new)):
        if _norm(old.get(k)) != _norm(new.get(k)):
            diffs.append(f"recipe key {k!r}: checkpoint {old.get(k)!r}, now {new.get(k)!r}")
    if diffs:
        raise TrainerError(f"cannot --resume from {folder}: " + "; ".join(diffs) +
                           ". Resume with the checkpoint's recipe and data, or start a new --out")


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def gather_states(model, optimizer, fsdp: bool, main: bool):
    """(a model to export, the optimizer state) for a checkpoint. Under FSDP the sharded weights and
    optimizer state are gathered into full tensors on the CPU (a collective: every rank calls it),
    and rank 0 exports a CPU copy of the model built from them."""
    if not fsdp:
        return model, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if not main:
        return None, osd
    from ..model import QovaryxForCausalLM

    with torch.device("meta"):
        copy = QovaryxForCausalLM(model.config)
    copy.load_state_dict(sd, assign=True, strict=False)
    if model.config.tie_embeddings:
        copy.tie_weights()
    return copy, osd


def load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
