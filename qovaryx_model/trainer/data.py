"""What the trainer feeds the model: a deterministic, resumable sampler over packed datasets, and
the loader that turns its plans into batches in DataLoader worker processes.

The unit of data is an **item**: a text window of `longest + 1` tokens at stride `longest` (from
`text_spans`, so it never cuts a row with an image or a label), or one such row, served whole.
Each dataset shuffles its items once per epoch (numpy permutation seeded by `(seed, dataset,
epoch)`), without replacement; several datasets are interleaved by weight as Megatron's
`BlendedDataset` does (each next item comes from the dataset furthest behind its share).

At sequence length L (the curriculum's stage) a window is cut into `longest / L` sequences of
L + 1 tokens (OLMo-core's way: the tokens of a step stay constant), and a micro-batch holds
`tokens_per_batch / L` sequences. A row takes one sequence slot, padded to L + 1 (to its own
length when longer; rows longer than max_seq_len + 1 are refused before training starts). At a
stage switch the unused pieces of a half-consumed window are dropped (counted in the sampler).

    step plan (grad_accum 2, L = 4, tokens_per_batch 8, longest 8):
      micro-batch 0: window@0 pieces [0, 5) [4, 9)      micro-batch 1: row 17, window@8 piece [8, 13)
      (the rest of window@8, piece [12, 17), opens the next micro-batch)

Under DDP every rank plans the whole global step (cheap: integers only) and loads only its own
micro-batches (rank r takes r, r + N, ...), so ranks read disjoint data and the data-order
fingerprint (a running blake2b of every planned entry) is the same on every rank and equal to a
single process's.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qovaryx_data import PackedDataset
from qovaryx_data.collate import IGNORE_INDEX, collate, row_example, text_window, window_starts

from .recipe import TrainerError

WINDOW, ROW = 0, 1  # entry kinds


@dataclass(frozen=True)
class DataSpec:
    path: Path  # a dataset folder (the one holding dataset.json)
    weight: float = 1.0  # share in a blend (normalised over all datasets)


def resolve_data(data: Any, where: str = "--data") -> tuple[list[DataSpec], Path | None]:
    """`data` as dataset specs, and the validation folder it implies (`<pack>/val` beside `train/`).

    Accepts a dataset folder, a pack output folder holding train/ (and val/), or a list of paths or
    {path, weight} maps."""
    if data is None:
        raise TrainerError(f"{where}: no training data; give --data DIR (a packed dataset, or a pack output "
                           "folder holding train/)")
    items = data if isinstance(data, list) else [data]
    specs, val = [], None
    for item in items:
        if isinstance(item, dict):
            unknown = set(item) - {"path", "weight"}
            if unknown or "path" not in item:
                raise TrainerError(f"{where}: a blend entry needs `path` (and optionally `weight`), got {item!r}")
            path, weight = Path(item["path"]), item.get("weight", 1.0)
        else:
            path, weight = Path(item), 1.0
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise TrainerError(f"{where}: weight {weight!r} of {path} is not a number") from None
        if not weight > 0 or not math.isfinite(weight):
            raise TrainerError(f"{where}: weight of {path} must be > 0, got {weight}")
        if not (path / "dataset.json").is_file() and (path / "train" / "dataset.json").is_file():
            if (path / "val" / "dataset.json").is_file() and len(items) == 1:
                val = path / "val"
            path = path / "train"
        if not (path / "dataset.json").is_file():
            raise TrainerError(f"{where}: {path} is not a packed dataset (no dataset.json); give the folder "
                               "that `qovaryx-data pack` wrote (or its train/ subfolder)")
        specs.append(DataSpec(path, weight))
    return specs, val


def dataset_fingerprint(ds: PackedDataset) -> str:
    """Content identity of a packed dataset: a hash of every data file's recorded checksum."""
    import json

    files = {k: v for k, v in ds.info["files"].items() if not k.startswith("tokenizer")}
    return hashlib.blake2b(json.dumps(files, sort_keys=True).encode(), digest_size=16).hexdigest()


def row_lengths(ds: PackedDataset, rows: np.ndarray) -> np.ndarray:
    """Token counts of rows `rows` (vectorised over the offset memmaps)."""
    rows = np.asarray(rows, dtype=np.int64)
    return ds._doc_offsets_at(rows + 1) - ds._doc_offsets_at(rows)


class Source:
    """One dataset's items in epoch order: shuffled once per epoch, without replacement."""

    def __init__(self, ds: PackedDataset, index: int, longest: int, seed: int):
        self.ds, self.index, self.seed = ds, index, seed
        self.windows = window_starts(ds.text_spans, longest + 1, stride=longest)
        self.rows = ds.multimodal_doc_indices
        self.n = len(self.windows) + len(self.rows)
        if self.n == 0:
            raise TrainerError(f"{ds.path}: no training item: no run of text-only rows holds {longest + 1} "
                               f"tokens and no row has an image or a label; use a shorter max_seq_len or more data")
        self.epoch = self.pos = 0
        self._perm: np.ndarray | None = None

    def next(self) -> tuple[int, int]:
        if self.pos == self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.index, self.epoch]).permutation(self.n)
        i = int(self._perm[self.pos])
        self.pos += 1
        nw = len(self.windows)
        return (WINDOW, int(self.windows[i])) if i < nw else (ROW, int(self.rows[i - nw]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n}

    def load_state_dict(self, st: dict) -> None:
        if st["n"] != self.n:
            raise TrainerError(f"{self.ds.path}: the checkpoint's sampler saw {st['n']} items in this dataset, "
                               f"now there are {self.n} (another dataset or max_seq_len?)")
        self.epoch, self.pos, self._perm = int(st["epoch"]), int(st["pos"]), None


class Sampler:
    """Plans optimizer steps: which (dataset, window piece or row) fills each micro-batch slot."""

    def __init__(self, datasets: list[PackedDataset], weights: list[float], recipe, seed: int):
        self.recipe = recipe
        self.sources = [Source(ds, i, recipe.longest, seed) for i, ds in enumerate(datasets)]
        total = sum(weights)
        self.weights = np.array([w / total for w in weights])
        self.counts = np.zeros(len(datasets), dtype=np.int64)  # items drawn per dataset (the blend)
        self.pending: list[int] | None = None  # [dataset, window start, next piece, seq_len]
        self.step = 0  # next optimizer step to plan
        self.dropped_pieces = 0  # window pieces left unused at stage switches
        self.fingerprint = hashlib.blake2b(b"qovaryx-data-order-v1", digest_size=16).hexdigest()

    def _next_item(self) -> tuple[int, int, int]:
        total = int(self.counts.sum())
        d = int(np.argmax(self.weights * (total + 1) - self.counts))  # furthest behind its share
        self.counts[d] += 1
        kind, x = self.sources[d].next()
        return d, kind, x

    def plan_step(self) -> list[np.ndarray]:
        """The global step's micro-batches, each an int64 array of entries (kind, dataset, start or
        row, seq_len); advances the state by one optimizer step."""
        r = self.recipe
        L = r.seq_len_at(self.step)
        per_batch = r.tokens_per_batch // L
        if self.pending is not None and self.pending[3] != L:  # stage switch: the rest of that window goes
            self.dropped_pieces += r.longest // self.pending[3] - self.pending[2]
            self.pending = None
        micro = []
        for _ in range(r.grad_accum_steps):
            entries = []
            while len(entries) < per_batch:
                if self.pending is None:
                    d, kind, x = self._next_item()
                    if kind == ROW:
                        entries.append((ROW, d, x, L))
                        continue
                    self.pending = [d, x, 0, L]
                d, start, piece, _ = self.pending
                entries.append((WINDOW, d, start + piece * L, L))
                self.pending[2] += 1
                if self.pending[2] == r.longest // L:
                    self.pending = None
            micro.append(np.array(entries, dtype=np.int64))
        h = hashlib.blake2b(bytes.fromhex(self.fingerprint), digest_size=16)
        for m in micro:
            h.update(m.tobytes())
        self.fingerprint = h.hexdigest()
        self.step += 1
        return micro

    def state_dict(self) -> dict:
        return {"sources": [s.state_dict() for s in self.sources], "counts": self.counts.tolist(),
                "pending": list(self.pending) if self.pending is not None else None, "step": self.step,
                "dropped_pieces": self.dropped_pieces, "fingerprint": self.fingerprint}

    def load_state_dict(self, st: dict) -> None:
        if len(st["sources"]) != len(self.sources):
            raise TrainerError(f"the checkpoint's sampler blends {len(st['sources'])} datasets, this run "
                               f"{len(self.sources)}")
        for s, ss in zip(self.sources, st["sources"]):
            s.load_state_dict(ss)
        self.counts = np.array(st["counts"], dtype=np.int64)
        self.pending = list(st["pending"]) if st["pending"] is not None else None
        self.step, self.dropped_pieces = int(st["step"]), int(st["dropped_pieces"])
        self.fingerprint = st["fingerprint"]


class PlanStream(torch.utils.data.Sampler):
    """The DataLoader's index stream: this rank's micro-batch plans, step after step, each with the
    sampler's state after its whole step (what a checkpoint at that step must hold)."""

    def __init__(self, sampler: Sampler, rank: int = 0, world: int = 1):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self):
        while True:
            step = self.sampler.step
            micro = self.sampler.plan_step()
            state = self.sampler.state_dict()
            mine = list(range(self.rank, len(micro), self.world))
            for j, g in enumerate(mine):
                yield {"step": step, "micro": g, "entries": micro[g], "seq_len": int(micro[g][0, 3]),
                       "last": j == len(mine) - 1, "state": state}


class BatchLoader(torch.utils.data.Dataset):
    """Loads a plan's entries from the memory-mapped datasets and collates them (runs in the
    DataLoader's workers: PackedDataset pickles by path and reopens its memmaps there).

    `as_numpy`: hand the batch out as numpy arrays, which cross from a worker pickled through the
    pipe, instead of tensors, which cross as shared-memory files (one file descriptor each). For a
    CPU run's small batches that is 0.3 ms against 1.0 ms per batch of four 16x129 tensors
    (measured), i.e. 1-4% of a small model's step; `as_batch` turns them back into tensors without
    a copy. CUDA runs keep tensors: the DataLoader's pin-memory thread receives and pins them off
    the training thread."""

    def __init__(self, datasets: list[PackedDataset], image_shape: tuple | None, decisions: bool,
                 as_numpy: bool = False):
        self.datasets, self.image_shape, self.decisions = datasets, image_shape, decisions
        self.as_numpy = as_numpy

    def __len__(self) -> int:  # map-style, indexed by plans (see PlanStream)
        return 2**62

    def __getitem__(self, plan: dict) -> dict:
        batch = self.load(plan["entries"])
        if self.as_numpy:
            batch = {k: v.numpy() for k, v in batch.items()}
        return {"plan": {k: v for k, v in plan.items() if k != "entries"}, "batch": batch}

    def load(self, entries: np.ndarray) -> dict[str, torch.Tensor]:
        examples = []
        for kind, d, x, L in entries.tolist():
            ds = self.datasets[d]
            examples.append(text_window(ds, x, L + 1) if kind == WINDOW else row_example(ds, x))
        L = int(entries[0, 3])
        pad_to = max([L + 1] + [len(e.input_ids) for e in examples])
        batch = collate(examples, pad_to=pad_to, image_shape=self.image_shape, decisions=self.decisions or None)
        return mask_first_tokens(batch)


def keep_as_is(item):
    """The DataLoader's collate_fn: items are whole batches already (and numpy stays numpy)."""
    return item


def as_batch(batch: dict) -> dict[str, torch.Tensor]:
    """A loaded batch as tensors (numpy arrays from `BatchLoader(as_numpy=True)` without a copy)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def mask_first_tokens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """labels = -100 at each row's first token and at each document's first token: neither is a
    next-token target (the token before it is another document's), so HF's count of
    `labels[..., 1:] != -100` equals the model's count of targets."""
    labels = batch["labels"].clone()
    labels[:, 0] = IGNORE_INDEX
    docs = batch.get("document_ids")
    if docs is not None:
        labels[:, 1:].masked_fill_(docs[:, 1:] != docs[:, :-1], IGNORE_INDEX)
    batch["labels"] = labels
    return batch


def eval_plans(ds: PackedDataset, seq_len: int, eval_tokens: int, tokens_per_batch: int,
               max_rows: int = 2048) -> list[np.ndarray]:
    """A fixed, deterministic validation set: the first ceil(eval_tokens / seq_len) windows of
    seq_len + 1 tokens at stride seq_len, and the first `max_rows` rows with an image or a label,
    in micro-batches of tokens_per_batch / seq_len sequences."""
    per_batch = max(tokens_per_batch // seq_len, 1)
    n = -(-eval_tokens // seq_len)
    starts = window_starts(ds.text_spans, seq_len + 1, stride=seq_len)[:n]
    rows = ds.multimodal_doc_indices[:max_rows]
    entries = [(WINDOW, 0, int(s), seq_len) for s in starts] + [(ROW, 0, int(r), seq_len) for r in rows]
    return [np.array(entries[i:i + per_batch], dtype=np.int64) for i in range(0, len(entries), per_batch)]


def token_bytes(tokenizer_dir: Path, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte. Exact for
    byte-level BPE (one symbol per byte); other tokenizers fall back to decoding each id alone."""
    from qovaryx_data.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(tokenizer_dir)
    special = set(special_token_ids(tok).values())
    byte_level = "ByteLevel" in str(tok.pre_tokenizer) or "ByteLevel" in str(tok.decoder)
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, tok.get_vocab_size(with_added_tokens=True))):
        if i in special:
            continue
        t = tok.id_to_token(i)
        if t is None:
            continue
        out[i] = len(t) if byte_level else len(tok.decode([i]).encode("utf-8"))
    return out


def unigram_entropy(ds: PackedDataset, vocab_size: int) -> float:
    """Entropy (nats/token) of the dataset's token frequencies: what a model that knows only how
    often each token occurs reaches; training must go well below it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    chunk = 1 << 24
    for s in range(0, ds.num_tokens, chunk):
        counts += np.bincount(ds.window(s, min(chunk, ds.num_tokens - s)), minlength=vocab_size)[:vocab_size]
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
