"""Interop with Hugging Face `datasets`, both ways.

* Out: `to_hf(ds)` turns a PackedDataset into a `datasets.Dataset` (Arrow, in the `datasets`
  cache) -- columns ``input_ids`` (int32 lists: the row's tokens as packed), and where the dataset
  has them ``image`` (an ``Image()`` feature, lossless PNG of the stored pixels), ``decision``
  (a ``ClassLabel``) and ``decision_position``. `to_hf(ds, iterable=True)` gives an
  ``IterableDataset`` that reads rows lazily from the memmaps (nothing materialized), sharded
  into row ranges so DataLoader workers can split it.
* In: a ``save_to_disk`` folder is a source with ``format: hf`` (qovaryx_data.sources reads it;
  ``Image()`` and ``ClassLabel`` columns are detected there). For a `datasets.Dataset` object in
  Python, `pack_dataset(dataset, tokenizer=..., out=...)` packs it directly; underneath,
  `as_source(dataset, workdir)` saves it (images embedded) under `workdir` once and returns the
  manifest source entry pointing at it.

    >>> hf = to_hf(PackedDataset("build/packed/x"))            # doctest: +SKIP
    >>> hf.features["decision"].names
    ['hold', 'buy', 'sell', 'abstain']
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from qovaryx_data.images import to_pil

if TYPE_CHECKING:
    import datasets

    from qovaryx_data.manifest import SourceSpec

HF_EXPORT_VERSION = "1"   # part of the cache fingerprint: bump when the columns change
ROWS_PER_SHARD = 8192     # IterableDataset shard size (row ranges), for DataLoader workers


def _has_decisions(ds: Any) -> bool:
    """Does the dataset carry decision labels? dataset.json's ``decision`` says so: the packer
    always writes it ({"num_classes", "labels"} when a source has labels, else null)."""
    return ds.info.get("decision") is not None


def hf_features(ds: Any) -> datasets.Features:
    """The `datasets.Features` that `to_hf` writes for `ds`."""
    import datasets

    feats: dict[str, Any] = {"input_ids": datasets.List(datasets.Value("int32"))}
    if ds.image_shape is not None:
        feats["image"] = datasets.Image()
    if _has_decisions(ds):
        names = list(ds.decision_names or [str(k) for k in range(ds.num_decision_classes)])
        feats["decision"] = datasets.ClassLabel(names=names)
        feats["decision_position"] = datasets.Value("int32")
    return datasets.Features(feats)


def _rows(ds: Any, ranges: list[tuple[int, int]], columns: tuple[str, ...]) -> Iterator[dict]:
    """Generator behind both exports: rows of `ds` in the given [start, stop) ranges."""
    for start, stop in ranges:
        for i in range(start, stop):
            doc = ds[i]
            rec: dict[str, Any] = {"input_ids": np.asarray(doc.tokens, dtype=np.int64).tolist()}
            if "image" in columns:
                rec["image"] = None if doc.image is None else to_pil(np.asarray(doc.image))
            if "decision" in columns:
                rec["decision"] = doc.decision
                rec["decision_position"] = doc.decision_position
            yield rec


def _export_fingerprint(ds: Any) -> str:
    """Identity of the packed content (dataset.json holds every file's checksum)."""
    h = xxhash.xxh3_128(json.dumps(ds.info, sort_keys=True, default=str).encode())
    h.update(HF_EXPORT_VERSION.encode())
    return h.hexdigest()


def to_hf(ds: Any, iterable: bool = False, *, cache_dir: str | None = None,
          rows_per_shard: int = ROWS_PER_SHARD) -> datasets.Dataset | datasets.IterableDataset:
    """`ds` (a PackedDataset) as a `datasets.Dataset`, or an `IterableDataset` when `iterable`.

    The Dataset is written once to the `datasets` cache (or `cache_dir`) under a fingerprint of
    the packed content, so calling it again is free and a re-packed dataset is never served stale.
    """
    import datasets

    features = hf_features(ds)
    n = len(ds)
    ranges = [(a, min(a + rows_per_shard, n)) for a in range(0, n, rows_per_shard)]
    kwargs = {"ds": ds, "ranges": ranges, "columns": tuple(features)}
    if iterable:
        # a list in gen_kwargs is split across shards: one shard per row range
        kwargs["ranges"] = [[r] for r in ranges] or [[]]
        return datasets.IterableDataset.from_generator(_shard_rows, features=features,
                                                       gen_kwargs=kwargs)
    return datasets.Dataset.from_generator(_rows, features=features, gen_kwargs=kwargs,
                                           cache_dir=cache_dir, fingerprint=_export_fingerprint(ds))


def _shard_rows(ds: Any, ranges: list[list[tuple[int, int]]],
                columns: tuple[str, ...]) -> Iterator[dict]:
    # IterableDataset hands each shard a sub-list of `ranges` (a list of one-range lists)
    for chunk in ranges:
        yield from _rows(ds, chunk, columns)


# ---- in: a datasets.Dataset object as a pack source ----

def save_dataset(dataset: datasets.Dataset, workdir: str | os.PathLike) -> Path:
    """Save `dataset` (images embedded) to ``workdir/hf-sources/<fingerprint>`` once; return it.

    Named by the dataset's `datasets` fingerprint, so the same object saved again is not rewritten
    (its files keep their mtimes and a re-run of the pack does no work). Written atomically.
    """
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"as_source: got a DatasetDict with splits {list(dataset)}; pass one "
                         "split, e.g. dataset['train']")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"as_source: expected a datasets.Dataset, got {type(dataset).__name__}")
    root = Path(workdir) / "hf-sources"
    out = root / dataset._fingerprint
    if (out / "state.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dataset._fingerprint}.", dir=root))
    try:
        dataset.save_to_disk(str(tmp / "d"))
        os.replace(tmp / "d", out)
    except OSError:
        if not (out / "state.json").exists():   # not a concurrent save of the same dataset
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def as_source(dataset: datasets.Dataset, workdir: str | os.PathLike, **fields: Any) -> SourceSpec:
    """A manifest source entry (``format: hf``) for an in-memory `datasets.Dataset`.

    `fields` are SourceSpec options (``text_field``, ``decision_position``, ...); ``Image()`` and
    ``ClassLabel`` columns need none. Example::

        spec = as_source(Dataset.from_dict({"text": [...], "label": [...]}), "build/work",
                         decision_field="label")
    """
    from qovaryx_data.manifest import SourceSpec

    return SourceSpec(path=str(save_dataset(dataset, workdir)), format="hf", **fields)


def pack_dataset(dataset: datasets.Dataset, *, tokenizer: str | os.PathLike,
                 out: str | os.PathLike, name: str = "hf", images: dict | None = None,
                 source_dir: str | os.PathLike | None = None, workers: int | None = None,
                 progress: bool = True, **options: Any):
    """Pack an in-memory `datasets.Dataset` directly (the Python-API twin of a manifest).

    The dataset is saved once (images embedded) under `source_dir` (default: ``<out>.sources``
    beside the output) and packed as a ``format: hf`` source. `images` is the manifest's
    ``images:`` block (needed when rows carry images); other `options` go to the source entry
    (``text_field``, ``decision_field``, ``decision_position``, ...) or to the manifest
    (``shard_tokens``, ``validation``, ``on_error``, ``separator``, ...). Returns the PackResult.

        >>> pack_dataset(hf, tokenizer="build/tokenizer", out="build/packed/fm",   # doctest: +SKIP
        ...              images={"size": [28, 28], "mode": "L"})
    """
    import dataclasses

    from qovaryx_data.manifest import PackManifest, SourceSpec
    from qovaryx_data.packer import pack

    source_keys = {f.name for f in dataclasses.fields(SourceSpec)} - {"path", "format"}
    manifest_keys = {f.name for f in dataclasses.fields(PackManifest)} - {
        "name", "tokenizer", "sources", "output", "images", "base_dir"}
    unknown = set(options) - source_keys - manifest_keys
    if unknown:
        raise TypeError(f"pack_dataset: unknown option(s) {sorted(unknown)}; source options: "
                        f"{sorted(source_keys)}; manifest options: {sorted(manifest_keys)}")
    out = Path(out).resolve()
    if source_dir is None:
        source_dir = out.with_name(out.name + ".sources")
    spec = as_source(dataset, source_dir, **{k: v for k, v in options.items() if k in source_keys})
    m = PackManifest(name=name, tokenizer=str(Path(tokenizer).resolve()), sources=(spec,),
                     output=str(out), images=images,
                     **{k: v for k, v in options.items() if k in manifest_keys})
    return pack(m, workers=workers, progress=progress)
