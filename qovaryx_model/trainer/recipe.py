"""Training recipes: the model card's keys as a typed, validated dataclass read from YAML.

A recipe names the model (`preset` plus any `QovaryxConfig` field: `ffn_kind`, `mtp_k`, ...) and
the training (`target_tokens`, `tokens_per_batch`, `length_curriculum`, `lr`, ...). Unknown keys,
wrong types and impossible values raise `RecipeError` naming the key and the file.

    >>> r = Recipe(target_tokens=1_000_000, tokens_per_batch=4096, max_seq_len=2048,
    ...            length_curriculum="(512,1000)(1024,3000)(2048,10000)(4096,-1)")
    >>> [(s.seq_len, s.until_step) for s in r.stages]          # 4096 is capped at max_seq_len
    [(512, 1000), (1024, 3000), (2048, -1)]
    >>> r.seq_len_at(999), r.seq_len_at(1000), r.seq_len_at(50_000)
    (512, 1024, 2048)
"""
from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import PRESETS, QovaryxConfig

RECIPE_FORMAT = "qovaryx-recipe"  # optional `format:` key of a recipe file
RECIPE_VERSION = 1


class TrainerError(Exception):
    """A mistake in the trainer's inputs (recipe, data, checkpoint); the message names the fix."""


class RecipeError(TrainerError, ValueError):
    """An invalid recipe key or value."""


# Keys that may differ between a run and its --resume: they do not change the math.
NON_MATH_KEYS = frozenset({"eval_every", "eval_tokens", "save_every", "keep_checkpoints", "log_every",
                           "num_workers", "tensorboard", "peak_flops", "data"})

# Model fields a recipe may set: every QovaryxConfig field but the bookkeeping ones.
_NOT_RECIPE_FIELDS = {"format_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
                      "vocab_size", "decision_class_weights"}


def model_fields() -> dict[str, Any]:
    """QovaryxConfig's own fields (name -> default) that a recipe may set."""
    return {k: getattr(QovaryxConfig, k) for k in QovaryxConfig.__annotations__
            if k not in _NOT_RECIPE_FIELDS and not k.startswith("_") and hasattr(QovaryxConfig, k)}


@dataclass(frozen=True)
class Stage:
    seq_len: int  # sequence length of this stage
    until_step: int  # optimizer step where the next stage begins; -1: to the end


_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(value: Any, key: str) -> int:
    """An integer, or a string such as "500M", "2B", "1.5e9", "500_000_000".

    >>> parse_count("500M", "target_tokens"), parse_count("1.5B", "x"), parse_count(4096, "x")
    (500000000, 1500000000, 4096)
    """
    if isinstance(value, bool):
        raise RecipeError(f"{key}: expected a count, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        s = value.strip().replace("_", "").replace(",", "").lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmbgt]?)", s)
        if m:
            x = float(m.group(1)) * _SUFFIX.get(m.group(2), 1)
            if x.is_integer():
                return int(x)
    raise RecipeError(f"{key}: expected a whole count such as 500000000 or '500M', got {value!r}")


def parse_curriculum(value: Any) -> list[Stage]:
    """The card's string "(512,1000)(1024,3000)(4096,-1)", or a YAML list of [seq_len, until_step]
    pairs or {seq_len, until_step} maps."""
    if value is None or value == "" or value == []:
        return []
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, str):
        body = value.replace(" ", "")
        found = re.findall(r"\((-?\d+),(-?\d+)\)", body)
        if not found or "".join(f"({a},{b})" for a, b in found) != body:
            raise RecipeError(f"length_curriculum: cannot read {value!r}; write stages as "
                              "(seq_len,until_step) pairs, e.g. (512,1000)(1024,3000)(2048,-1)")
        pairs = [(int(a), int(b)) for a, b in found]
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and set(item) == {"seq_len", "until_step"}:
                pairs.append((item["seq_len"], item["until_step"]))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                pairs.append(tuple(item))
            else:
                raise RecipeError(f"length_curriculum: stage {item!r} is not [seq_len, until_step] or "
                                  "{seq_len: N, until_step: M}")
    else:
        raise RecipeError(f"length_curriculum: expected a string or a list, got {type(value).__name__}")
    stages = []
    for L, until in pairs:
        if not isinstance(L, int) or not isinstance(until, int) or isinstance(L, bool):
            raise RecipeError(f"length_curriculum: stage ({L!r}, {until!r}) must hold two integers")
        stages.append(Stage(L, until))
    return stages


@dataclass
class Recipe:
    """A training recipe (docs/TRAINING.md lists every key with its default and the card's values)."""

    # --- model: a preset plus QovaryxConfig fields (e.g. ffn_kind, mtp_k, decision_head_enabled) ---
    preset: str = "debug"  # debug | 50m | 350m | 1b (the card's shapes)
    model: dict = field(default_factory=dict)  # QovaryxConfig overrides, gathered from top-level keys
    # --- budget and batch arithmetic ---
    target_tokens: int = 0  # the LR schedule spans this many tokens (required)
    tokens_per_batch: int = 4096  # tokens of ONE micro-batch (sequences = tokens_per_batch / seq_len)
    grad_accum_steps: int = 1  # micro-batches per optimizer step, across all ranks
    max_seq_len: int = 2048  # longest sequence; validation runs at this length
    length_curriculum: Any = None  # "(512,1000)(1024,-1)" or a list; None: max_seq_len throughout
    # --- optimization ---
    optimizer: str = "adamw"  # a key of trainer.optim.OPTIMIZERS: adamw | adamw_8bit | muon
    lr: float = 2e-4  # peak learning rate
    matrix_lr_mult: float = 1.0  # the hidden matrices' peak lr is lr x this (Muon: 4, docs/MODEL.md)
    embed_lr_mult: float = 1.0  # the token embedding's peak lr is lr x this
    min_lr: float | None = None  # cosine floor; None: lr / 10
    warmup_steps: int = 500  # linear warmup from 0 (capped at the schedule's length)
    weight_decay: float = 0.1  # on matrices only: never on norms, biases, embeddings, 1-D params
    betas: tuple = (0.9, 0.95)  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    mixed_precision: str = "bf16"  # bf16 | fp32: bf16 autocast on CUDA (CPU stays fp32 unless autocast_cpu)
    autocast_cpu: bool = False  # also use bf16 autocast on CPU (slow on most CPUs; for tests of the path)
    param_dtype: str = "fp32"  # fp32 master weights, or bf16 weights (half the memory; the card's 1B on 16 GB)
    class_weighted_decision: bool = False  # decision CE weights N / (C * n_c) from the dataset's counts
    seed: int = 0  # model init and data order
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in the backward
    distributed: str = "ddp"  # ddp | fsdp (under torchrun; FSDP2 fully_shard per block)
    # --- evaluation, checkpoints, logging ---
    eval_every: int = 0  # validation every N steps (0: at the end only)
    eval_tokens: int = 65536  # tokens of validation windows per evaluation (a fixed set)
    save_every: int = 0  # checkpoint every N steps (0: at the end only); SIGTERM also saves
    keep_checkpoints: int = 2  # newest N checkpoints kept
    log_every: int = 1  # progress-bar refresh; metrics.jsonl always gets every step
    num_workers: int = 2  # DataLoader worker processes (0: load in the training process)
    tensorboard: bool = False  # also log to out/tensorboard when tensorboard is installed
    peak_flops: float | None = None  # device peak bf16 FLOP/s for MFU; None: the table in metrics.py
    data: Any = None  # a dataset path or [{path, weight}, ...]; --data overrides
    source: str | None = field(default=None, compare=False)  # the file it was read from (for messages)

    def __post_init__(self):
        where = f" in {self.source}" if self.source else ""

        def bad(key: str, msg: str) -> RecipeError:
            return RecipeError(f"recipe key {key!r}{where}: {msg}")

        for key in ("preset", "optimizer", "mixed_precision", "param_dtype", "distributed"):
            if not isinstance(getattr(self, key), str):
                raise bad(key, f"expected a name (a string), got {getattr(self, key)!r}")
        if self.preset not in PRESETS:
            raise bad("preset", f"{self.preset!r} is not a preset; choose one of {sorted(PRESETS)}")
        for key in ("target_tokens", "tokens_per_batch", "eval_tokens"):
            try:
                setattr(self, key, parse_count(getattr(self, key), key))
            except RecipeError as e:
                raise bad(key, str(e).split(": ", 1)[1]) from None
        for key in ("lr", "weight_decay", "eps", "grad_clip") + (("min_lr",) if self.min_lr is not None else ()) \
                + (("peak_flops",) if self.peak_flops is not None else ()):
            setattr(self, key, _as_float(getattr(self, key), bad(key, "expected a number")))
        for key in ("grad_accum_steps", "max_seq_len", "warmup_steps", "seed", "eval_every", "save_every",
                    "keep_checkpoints", "log_every", "num_workers"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(key, f"expected an integer, got {v!r}")
        for key in ("class_weighted_decision", "compile", "activation_checkpointing", "autocast_cpu", "tensorboard"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, f"expected true or false, got {getattr(self, key)!r}")
        if self.target_tokens < 1:
            raise bad("target_tokens", "must be set to the number of training tokens (e.g. 500M)")
        for key in ("tokens_per_batch", "grad_accum_steps", "max_seq_len", "keep_checkpoints", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "eval_every", "save_every", "num_workers", "seed"):
            if getattr(self, key) < 0:
                raise bad(key, f"must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise bad("lr", f"must be a positive number, got {self.lr}")
        for key in ("matrix_lr_mult", "embed_lr_mult"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise bad(key, f"must be a positive number, got {v!r}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if not 0 <= self.min_lr <= self.lr:
            raise bad("min_lr", f"must lie in [0, lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise bad("weight_decay" if self.weight_decay < 0 else "grad_clip" if self.grad_clip < 0 else "eps",
                      "must be >= 0 (eps > 0)")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise bad("betas", f"expected two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(float(b) for b in betas)
        from .optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"{self.optimizer!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
        if self.mixed_precision not in ("bf16", "fp32"):
            raise bad("mixed_precision", f"{self.mixed_precision!r}: choose bf16 or fp32")
        if self.param_dtype not in ("fp32", "bf16"):
            raise bad("param_dtype", f"{self.param_dtype!r}: choose fp32 or bf16")
        if self.distributed not in ("ddp", "fsdp"):
            raise bad("distributed", f"{self.distributed!r}: choose ddp or fsdp")
        if self.distributed == "fsdp" and self.optimizer == "muon":
            raise bad("optimizer", "muon is not supported with distributed: fsdp; use adamw or adamw_8bit")
        self._check_model(bad)
        self.stages = self._stages(bad)
        for s in self.stages:
            if self.tokens_per_batch % s.seq_len:
                raise bad("tokens_per_batch", f"{self.tokens_per_batch} is not divisible by the sequence length "
                                              f"{s.seq_len}: a micro-batch holds tokens_per_batch / seq_len sequences")

    def _check_model(self, bad) -> None:
        fields = model_fields()
        for k, v in self.model.items():
            if k not in fields:
                raise bad(k, "is not a recipe key nor a model field; see docs/TRAINING.md")
            if k == "max_seq_len":
                raise bad(k, "set max_seq_len at the top level of the recipe")
        for k in ("mtp_weight", "decision_weight", "calibration_loss_weight", "moe_aux_weight", "moe_z_weight"):
            if k in self.model:
                v = _as_float(self.model[k], bad(k, "expected a number"))
                if not (v >= 0 and math.isfinite(v)):
                    raise bad(k, f"a loss weight must be a finite number >= 0, got {v}")
                self.model[k] = v
        try:
            self.model_config(vocab_size=max(QovaryxConfig.vocab_size, 8))
        except (ValueError, TypeError) as e:
            raise RecipeError(f"recipe{where_of(self)}: the model it describes is invalid: {e}") from None

    def _stages(self, bad) -> list[Stage]:
        try:
            stages = parse_curriculum(self.length_curriculum)
        except RecipeError as e:
            raise bad("length_curriculum", str(e).split(": ", 1)[1]) from None
        if not stages:
            return [Stage(self.max_seq_len, -1)]
        for a, b in zip(stages, stages[1:]):
            if b.seq_len <= a.seq_len:
                raise bad("length_curriculum", f"sequence lengths must increase: {a.seq_len} then {b.seq_len}")
            if a.until_step < 1:
                raise bad("length_curriculum", f"stage ({a.seq_len},{a.until_step}) ends before step 1: a stage "
                                               "runs until the optimizer step given (>= 1; -1 for the last)")
            if b.until_step != -1 and b.until_step <= a.until_step:
                raise bad("length_curriculum", f"stage steps must increase: {a.until_step} then {b.until_step}")
        if stages[-1].until_step != -1:
            raise bad("length_curriculum", f"the last stage must run to the end: write ({stages[-1].seq_len},-1)")
        if any(s.seq_len < 1 for s in stages):
            raise bad("length_curriculum", "sequence lengths must be >= 1")
        capped = [s for s in stages if s.seq_len > self.max_seq_len]
        if capped:
            warnings.warn(f"recipe{where_of(self)}: length_curriculum stage(s) "
                          f"{', '.join(str(s.seq_len) for s in capped)} exceed max_seq_len={self.max_seq_len}: "
                          f"capped at {self.max_seq_len}", stacklevel=3)
            out: list[Stage] = []
            for s in stages:  # a capped stage merges into the one before it at max_seq_len
                s = Stage(min(s.seq_len, self.max_seq_len), s.until_step)
                if out and out[-1].seq_len == s.seq_len:
                    out[-1] = s
                else:
                    out.append(s)
            stages = out
        longest = stages[-1].seq_len
        for s in stages:
            if longest % s.seq_len:
                raise bad("length_curriculum", f"stage length {s.seq_len} does not divide the longest "
                                               f"{longest}: windows drawn at {longest} are cut into equal pieces")
        return stages

    # --- derived quantities ---
    @property
    def longest(self) -> int:
        """Length at which windows are drawn (the last stage's); each is cut into pieces at a shorter stage."""
        return self.stages[-1].seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.tokens_per_batch * self.grad_accum_steps

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the schedule: ceil(target_tokens / tokens_per_step)."""
        return max(1, -(-self.target_tokens // self.tokens_per_step))

    def seq_len_at(self, step: int) -> int:
        """Sequence length of optimizer step `step` (0-based)."""
        for s in self.stages:
            if s.until_step == -1 or step < s.until_step:
                return s.seq_len
        return self.stages[-1].seq_len

    def model_config(self, **extra) -> QovaryxConfig:
        return QovaryxConfig.from_preset(self.preset, **{**self.model, "max_seq_len": self.max_seq_len, **extra})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "source")}
        d["betas"] = list(self.betas)
        d.update(self.model)
        return d

    def math_dict(self) -> dict:
        """The keys that define the training math (a --resume must keep them)."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_MATH_KEYS}


def where_of(r: Recipe) -> str:
    return f" {r.source}" if r.source else ""


def _as_float(v: Any, err: Exception) -> float:
    if isinstance(v, bool):
        raise err
    try:
        return float(v)  # also "2e-4", which YAML 1.1 reads as a string
    except (TypeError, ValueError):
        raise err from None


def load_recipe(path: str | Path | None = None, overrides: dict | None = None, *,
                mapping: dict | None = None) -> Recipe:
    """A Recipe from a YAML file (or a mapping) with `overrides` (like --set key=value) applied."""
    source = str(path) if path is not None else None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"{p}: no such recipe file (the shipped ones are in pipelines/recipes/)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML: {e}") from None
    else:
        raw = dict(mapping or {})
    if not isinstance(raw, dict):
        raise RecipeError(f"{source or 'recipe'}: expected a mapping of keys to values at the top level")
    raw = {**raw, **(overrides or {})}
    fmt = raw.pop("format", None)
    version = raw.pop("format_version", None)
    if fmt is not None and fmt != RECIPE_FORMAT:
        raise RecipeError(f"{source}: format {fmt!r}, expected {RECIPE_FORMAT!r}")
    if version is not None and int(str(version).split(".")[0]) != RECIPE_VERSION:
        raise RecipeError(f"{source}: recipe format_version {version}, this trainer reads {RECIPE_VERSION}")
    own = {f.name for f in dataclasses.fields(Recipe)} - {"model", "source"}
    kw = {k: v for k, v in raw.items() if k in own}
    model = {k: v for k, v in raw.items() if k not in own}
    if "model" in raw and isinstance(raw["model"], dict):
        model = {**raw["model"], **{k: v for k, v in model.items() if k != "model"}}
    return Recipe(**kw, model=model, source=source)


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """`key=value` strings (values parsed as YAML: numbers, true/false, lists) into a dict."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else ""
        except yaml.YAMLError:
            out[k.strip()] = v
    return out
