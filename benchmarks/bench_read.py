"""Random 2049-token window reads, as a trainer does them: batches of 8 random windows copied into
one int64 (8, 2049) array. Ratios measured in the same run, best of 3 rounds each:

- `PackedDataset.window` vs a raw `np.memmap` of one flat token file (nanoGPT's train.bin) holding
  the same tokens (goal >= 0.9x), and vs the same memmap viewed as a plain ndarray (the floor:
  PackedDataset slices plain ndarray views too, which skips np.memmap's per-slice overhead);
- vs an HF `datasets` Arrow dataset of the same documents (`input_ids` column, memory-mapped
  from save_to_disk, numpy format), a window gathered from the documents it spans (goal >= 100x).

Corpus: Shakespeare + Austen + KJV packed with shards of 1M tokens (so windows do cross shards).

    .venv/bin/python benchmarks/bench_read.py [--batches N] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pack import make_corpus, tokenizer_dir  # noqa: E402

WINDOW = 2049
BATCH = 8


def read_packed(ds, starts: np.ndarray) -> np.ndarray:
    out = np.empty((len(starts) // BATCH, BATCH, WINDOW), np.int64)
    for k, s in enumerate(starts):
        out[k // BATCH, k % BATCH] = ds.window(int(s), WINDOW)
    return out


def read_raw(mm: np.ndarray, starts: np.ndarray) -> np.ndarray:
    out = np.empty((len(starts) // BATCH, BATCH, WINDOW), np.int64)
    for k, s in enumerate(starts):
        s = int(s)
        out[k // BATCH, k % BATCH] = mm[s:s + WINDOW]
    return out


def read_hf(hf, offsets: np.ndarray, starts: np.ndarray) -> np.ndarray:
    out = np.empty((len(starts) // BATCH, BATCH, WINDOW), np.int64)
    for k, s in enumerate(starts):
        s = int(s)
        i = int(np.searchsorted(offsets, s, side="right")) - 1
        pieces, have, lo = [], 0, s - int(offsets[i])
        while have < WINDOW:
            ids = hf[i]["input_ids"][lo:lo + WINDOW - have]
            pieces.append(ids)
            have += len(ids)
            i, lo = i + 1, 0
        out[k // BATCH, k % BATCH] = np.concatenate(pieces)
    return out


def best_rate(fn, starts: np.ndarray, rounds: int = 3) -> tuple[float, np.ndarray]:
    best, result = 0.0, None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn(starts)
        best = max(best, len(starts) / (time.perf_counter() - t0))
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, default=4000, help="batches of 8 windows per round")
    ap.add_argument("--hf-batches", type=int, default=40)
    ap.add_argument("--tokenizer", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import yaml

    from qovaryx_data import PackedDataset
    from qovaryx_data.packer import pack

    datasets.disable_progress_bars()
    tmp = Path(tempfile.mkdtemp(prefix="bench_read_"))
    try:
        sources = make_corpus(tmp / "corpus", 1)
        (tmp / "pack.yaml").write_text(yaml.safe_dump(
            {"name": "bench", "tokenizer": str(tokenizer_dir(args.tokenizer)), "output": "out",
             "shard_tokens": 1_000_000, "sources": sources}))
        pack(tmp / "pack.yaml", progress=False)
        ds = PackedDataset(tmp / "out")
        flat = np.concatenate([ds.window(0, ds.num_tokens)])
        flat.tofile(tmp / "train.bin")
        mm = np.memmap(tmp / "train.bin", dtype=flat.dtype, mode="r")
        del flat
        hf_docs = [ds[i].tokens.astype(np.int32).tolist() for i in range(len(ds))]
        datasets.Dataset.from_dict({"input_ids": hf_docs}).save_to_disk(str(tmp / "hf"))
        del hf_docs
        hf = datasets.load_from_disk(str(tmp / "hf")).with_format("numpy")
        offsets = ds.doc_offsets
        print(f"{len(ds):,} documents, {ds.num_tokens:,} tokens ({ds.dtype.name}), "
              f"{len(ds.info['shards'])} shards")

        rng = np.random.default_rng(0)
        starts = rng.integers(0, ds.num_tokens - WINDOW, size=args.batches * BATCH)
        r_packed, a = best_rate(lambda s: read_packed(ds, s), starts)
        r_raw, b = best_rate(lambda s: read_raw(mm, s), starts)
        assert np.array_equal(a, b)
        plain = mm.view(np.ndarray)        # the same mapping without the memmap subclass
        r_plain, b = best_rate(lambda s: read_raw(plain, s), starts)
        assert np.array_equal(a, b)
        hf_starts = starts[:args.hf_batches * BATCH]
        r_hf, c = best_rate(lambda s: read_hf(hf, offsets, s), hf_starts, rounds=1)
        assert np.array_equal(c, a[:args.hf_batches])
        print(f"PackedDataset.window: {r_packed:,.0f} windows/s")
        print(f"raw np.memmap:        {r_raw:,.0f} windows/s  (train.bin read as nanoGPT does)")
        print(f"raw memmap as ndarray:{r_plain:,.0f} windows/s  (no memmap subclass per slice)")
        print(f"HF datasets (numpy):  {r_hf:,.0f} windows/s")
        print(f"RATIO PackedDataset / raw memmap: {r_packed / r_raw:.2f}x  (goal >= 0.9x); "
              f"/ raw memmap as ndarray: {r_packed / r_plain:.2f}x")
        print(f"RATIO PackedDataset / HF datasets: {r_packed / r_hf:,.0f}x  (goal >= 100x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
