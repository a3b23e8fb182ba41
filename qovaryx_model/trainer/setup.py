"""Everything a run needs before its first step: the process group, the data and its checks, the
model (fresh, --init-from or --resume), so that loop.py holds only the training loop."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from qovaryx_data import PackedDataset
from qovaryx_data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, special_token_ids, tokenizer_hash

from ..config import QovaryxConfig
from ..model import QovaryxForCausalLM
from .checkpoint import load_model_weights
from .data import DataSpec, dataset_fingerprint, row_lengths
from .recipe import Recipe, TrainerError

# Model fields a recipe may change on top of an --init-from folder's config: they change the loss
# or the kernels, not the weights' shapes.
LOSS_FIELDS = ("mtp_weight", "decision_weight", "calibration_loss_weight", "decision_calibration",
               "moe_aux_weight", "moe_z_weight", "attn_backend")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t


def init_distributed() -> Dist:
    """A process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and os.environ.get("QOVARYX_DEVICE", "") != "cpu"
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Dist(rank, dist.get_world_size() if dist.is_initialized() else 1, local, device)


def shutdown_distributed() -> None:
    """End the process group of a torchrun launch (no-op otherwise): every rank first waits for the
    others, then destroys it. Call it after the last collective and after dropping the references to
    an FSDP model: its DTensors hold the group, and a gloo group that outlives interpreter shutdown
    can abort the process ("terminate called without an active exception")."""
    import gc

    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


@dataclass
class RunData:
    train: list[PackedDataset]
    weights: list[float]
    val: PackedDataset | None
    tokenizer_dir: Path
    tokenizer_hash: str
    fingerprints: dict  # dataset path -> content fingerprint (train and val)


def open_data(specs: list[DataSpec], val_path: Path | None) -> RunData:
    """Open the datasets and refuse a blend of different tokenizers."""
    train = [PackedDataset(s.path) for s in specs]
    hashes = {str(ds.path): ds.info["tokenizer"]["hash"] for ds in train}
    val = PackedDataset(val_path) if val_path is not None else None
    if val is not None:
        hashes[str(val.path)] = val.info["tokenizer"]["hash"]
    if len(set(hashes.values())) > 1:
        a, b = [(p, h) for p, h in hashes.items()][:1][0], next((p, h) for p, h in hashes.items()
                                                                if h != next(iter(hashes.values())))
        raise TrainerError(f"datasets packed with different tokenizers cannot be trained together: {a[0]} has "
                           f"{a[1][:16]}…, {b[0]} has {b[1][:16]}…; re-pack them with one tokenizer")
    fps = {str(ds.path): dataset_fingerprint(ds) for ds in train + ([val] if val is not None else [])}
    return RunData(train, [s.weight for s in specs], val, train[0].tokenizer_dir, train[0].info["tokenizer"]["hash"], fps)


def fresh_config(recipe: Recipe, data: RunData) -> QovaryxConfig:
    """The recipe's model, sized to the dataset's tokenizer (vocabulary and special-token ids)."""
    tok = load_tokenizer(data.tokenizer_dir)
    special = special_token_ids(tok)
    ids = {}
    if EOS_TOKEN in special:
        ids.update(bos_token_id=special[EOS_TOKEN], eos_token_id=special[EOS_TOKEN])
    if PAD_TOKEN in special:
        ids["pad_token_id"] = special[PAD_TOKEN]
    # rows of the embedding for every id the tokenizer can produce (ids may be sparse: not the count)
    vocab = max(tok.get_vocab_size(with_added_tokens=True), max(tok.get_vocab(with_added_tokens=True).values()) + 1)
    try:
        return recipe.model_config(vocab_size=vocab, **ids)
    except ValueError as e:
        raise TrainerError(f"recipe{' ' + recipe.source if recipe.source else ''}: {e}") from None


def init_config(recipe: Recipe, folder: Path, what: str = "--init-from") -> QovaryxConfig:
    """The config of an --init-from folder (its weights have that shape; the recipe's `preset` is not
    used), with the recipe's loss weights and max_seq_len. Any other model field the recipe sets
    must agree with the folder's."""
    cfg = QovaryxConfig.from_pretrained(str(folder))
    differ = [k for k, v in recipe.model.items() if k not in LOSS_FIELDS and getattr(cfg, k) != v]
    if differ:
        raise TrainerError(f"{what} {folder}: the recipe's model differs from the folder's in "
                           + ", ".join(f"{k} ({getattr(cfg, k)!r} there, {recipe.model[k]!r} in the recipe)"
                                       for k in differ)
                           + ("; drop those keys from the recipe to fine-tune this model" if what == "--init-from"
                              else "; resume with the checkpoint's recipe, or start a new --out"))
    for k in LOSS_FIELDS:
        if k in recipe.model:
            setattr(cfg, k, recipe.model[k])
    cfg.max_seq_len = recipe.max_seq_len
    cfg._validate()
    return cfg


def check_data_fits(cfg: QovaryxConfig, recipe: Recipe, data: RunData) -> None:
    """Image shape, decision classes and row lengths of the data against the model and recipe."""
    for ds in data.train + ([data.val] if data.val is not None else []):
        if ds.image_shape is not None:
            want = (cfg.image_size, cfg.image_size, cfg.image_channels)
            if not cfg.chart_patch_encoder_enabled:
                raise TrainerError(f"{ds.path}: rows carry images {ds.image_shape} but the model has no patch "
                                   "encoder: set chart_patch_encoder_enabled: true (and image_size, "
                                   "image_channels, patch_size) in the recipe")
            if tuple(ds.image_shape) != want:
                raise TrainerError(f"{ds.path}: images are {tuple(ds.image_shape)} (H, W, C), the model expects "
                                   f"{want} (image_size, image_size, image_channels); set those recipe keys to "
                                   "the dataset's shape or re-pack with that image size")
        if ds.info.get("decision"):
            if not cfg.decision_head_enabled:
                raise TrainerError(f"{ds.path}: rows carry decision labels but the model has no decision head: "
                                   "set decision_head_enabled: true in the recipe")
            if ds.num_decision_classes != cfg.decision_num_classes:
                raise TrainerError(f"{ds.path}: {ds.num_decision_classes} decision classes, the model's head has "
                                   f"{cfg.decision_num_classes}")
        rows = ds.multimodal_doc_indices
        if len(rows):
            lengths = row_lengths(ds, rows)
            i = int(np.argmax(lengths))
            if lengths[i] > recipe.max_seq_len + 1:
                doc = ds[int(rows[i])]
                n_long = int((lengths > recipe.max_seq_len + 1).sum())
                raise TrainerError(f"{ds.path}: {n_long} row(s) with an image or a label are longer than "
                                   f"max_seq_len + 1 = {recipe.max_seq_len + 1} tokens (the longest: {int(lengths[i])}, "
                                   f"{doc.source} row {doc.row}); such rows are served whole, never cut: raise "
                                   "max_seq_len or shorten those rows")


def decision_class_weights(data: RunData, n_classes: int) -> list[float]:
    """N / (C * n_c) from the training datasets' label counts; 0 for a class that never occurs."""
    counts = np.zeros(n_classes, dtype=np.float64)
    for ds in data.train:
        for src in ds.info.get("sources", []):
            dec = src.get("decisions")
            if dec:
                counts += np.asarray(list(dec.values()) if isinstance(dec, dict) else dec, dtype=np.float64)[:n_classes]
    n = counts.sum()
    if n == 0:
        raise TrainerError("class_weighted_decision: true, but the training data has no decision labels")
    return [float(n / (n_classes * c)) if c > 0 else 0.0 for c in counts]


def build_model(cfg: QovaryxConfig, seed: int, device: torch.device, init_from: Path | None,
                param_dtype: str = "fp32") -> QovaryxForCausalLM:
    torch.manual_seed(seed)
    model = QovaryxForCausalLM(cfg)
    if init_from is not None:
        load_model_weights(model, init_from)
    return model.to(device=device, dtype=torch.bfloat16 if param_dtype == "bf16" else torch.float32)


def check_tokenizer(folder: Path, data: RunData, what: str) -> None:
    """The model folder's tokenizer must be the dataset's (by content hash)."""
    if not (Path(folder) / "tokenizer.json").is_file():
        raise TrainerError(f"{what} {folder}: no tokenizer.json, so the data's tokenizer cannot be checked")
    got = tokenizer_hash(folder)
    if got != data.tokenizer_hash:
        raise TrainerError(f"{what} {folder} has tokenizer {got[:16]}…, the data ({data.train[0].path}) was packed "
                           f"with {data.tokenizer_hash[:16]}…: a model cannot read another tokenizer's ids")


def wrap_model(model: torch.nn.Module, fsdp: bool, dd: Dist) -> torch.nn.Module:
    """DDP under torchrun; with `fsdp`, FSDP2's fully_shard on every block and then the model (in place)."""
    if dd.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.model.layers) + [d.block for d in model.mtp]:
            fully_shard(block)
        return fully_shard(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dd.local_rank] if dd.device.type == "cuda" else None)
