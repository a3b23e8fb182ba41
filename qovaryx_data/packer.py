"""The pack-once compiler: a manifest's sources -> a packed dataset (docs/FORMAT.md).

Two stages, so that the output never depends on the number of workers:

1. **Map.** Sources are cut into fixed-size work units (`sources.plan_units`). A process pool
   (or Ray tasks: `executor="ray"`, `packing.executors`) tokenizes each unit (`encode_batch_fast`,
   one thread per process) and writes it atomically to
   ``<out>/.work/unit-NNNNNN.npz``: tokens, document lengths, per-row metadata, pixels, skip counts.
   A unit whose part exists is never redone, so a killed run resumes from its finished units.
2. **Assemble.** One process streams the parts in unit order into shards of each output dataset
   (``train``/``val`` with a validation share, else one), rolling to a new shard once a shard holds
   ``shard_tokens`` tokens. Tokens, offsets, metadata and pixels are appended chunk by chunk (memory
   does not grow with the corpus); then the tokenizer copy, checksums, and ``dataset.json`` last.

A fingerprint of the inputs (manifest, tokenizer hash, source files' sizes and mtimes, format and
code version) is stored in ``dataset.json``, and the image files read in ``image_files.json``; a
re-run with the same fingerprint and unchanged image files does nothing. Pack only ever touches
its own names in the output folder (OWN_NAMES), and refuses a non-empty folder that holds no
earlier pack unless forced.

This module is the orchestration (one pack run, start to end); its parts live beside it:
`qovaryx_data.packing.plan` (units, fingerprint, lock), `.executors` (where units run: `.pool`, the
local worker pool, or `.ray_executor`), `.units` (the worker side) and `qovaryx_data.writer` (the
shards and dataset.json, the mirror of reader.py).

    >>> pack("manifests/shakespeare.yaml", workers=2)           # doctest: +SKIP
    PackResult(out=PosixPath('build/packed/shakespeare'), up_to_date=False, documents=42, ...)
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qovaryx_data.errors import ManifestError, QovaryxDataError, SourceError
from qovaryx_data.format import (IMAGE_FILES, PACK_FORMAT_NAME, PACK_FORMAT_VERSION, SOURCE_FILES,
                                 dtype_name, token_dtype)
from qovaryx_data.manifest import DATASET_JSON, PackManifest, load_manifest, read_dataset_json
from qovaryx_data.packing.executors import Executor, ExecutorConfig, get_executor
from qovaryx_data.packing.plan import (LOCK_FILE, OWN_NAMES, PACK_CODE_VERSION, WORK_DIR,
                                       OutputLock, PackLockedError, PackSettings,
                                       image_files_unchanged, inputs_fingerprint, is_complete,
                                       plan_inputs, prepare_work_dir, refuse_foreign_output,
                                       resolve_sources)
from qovaryx_data.packing.pool import PackWorkerError, rebuild_error
from qovaryx_data.packing.units import (SKIP_SAMPLE_LIMIT, drop_parts_with_changed_images,
                                        is_line_range, load_part, part_path)
from qovaryx_data.sources import NUM_DECISION_CLASSES, shift_rows
from qovaryx_data.tokenizer import (EOS_TOKEN, load_tokenizer, max_token_id, special_token_ids,
                                    tokenizer_hash)
from qovaryx_data.writer import SHARD_FILE, DatasetWriter

__all__ = ["OWN_NAMES", "PackLockedError", "PackResult", "PackWorkerError", "pack"]


@dataclass
class PackResult:
    out: Path                       # the output folder
    datasets: dict[str, Path]       # split name ("" without validation) -> dataset folder
    up_to_date: bool                # True: nothing was done
    documents: int = 0              # all splits
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    units: int = 0                  # work units (a large .jsonl.zst counts its decoded pieces);
    #                                 0 when up to date (nothing is planned then)
    units_done: int = 0             # units tokenized by this run (the rest were resumed)
    seconds: float = 0.0


def pack(manifest: PackManifest | str | os.PathLike, *, out: str | os.PathLike | None = None,
         workers: int | None = None, progress: bool = True, force: bool = False,
         executor: Executor = "local", ray_address: str | None = None) -> PackResult:
    """Compile `manifest` into a packed dataset under `out` (default: the manifest's `output`).

    Idempotent (same inputs: returns with ``up_to_date=True``), resumable (finished units are
    kept in ``<out>/.work``), byte-identical for any `workers` and `executor`. Raises SourceError
    for a bad row with ``on_error: fail``, PackLockedError when another pack writes the same
    output, and QovaryxDataError for a non-empty `out` that holds no earlier pack unless `force`
    (even then only pack's own names are ever replaced or deleted there: see OWN_NAMES).

    `executor` chooses where the units run (`packing.executors`): "local", a process pool of
    `workers` processes (default: all usable cores); "ray", Ray tasks (`workers`: tasks to keep
    busy, default all the cluster's CPUs) on the Ray instance this process is connected to, else
    the cluster at `ray_address` ("auto", "HOST:PORT"; default $RAY_ADDRESS), else a Ray
    instance started on this machine for this pack. Ray is the optional extra ``qovaryx[ray]``.
    """
    t0 = time.perf_counter()
    run_config = ExecutorConfig(executor, ray_address)
    run_units = get_executor(run_config)    # a missing Ray fails here, before anything is read
    m = manifest if isinstance(manifest, PackManifest) else load_manifest(manifest)
    if out is None and m.output is None:
        raise QovaryxDataError(f"manifest {m.name!r} has no `output:`; give --out DIR")
    out_dir = Path(out if out is not None else m.output).resolve()
    if not force:
        refuse_foreign_output(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(out_dir / LOCK_FILE):
        return _pack_locked(m, out_dir, progress, t0,
                            lambda units, settings, piece_bytes: run_units(
                                units, settings, workers or None, piece_bytes, run_config))


# ============================================================================ the pack run

def _pack_locked(m: PackManifest, out_dir: Path, progress: bool, t0: float,
                 run_units) -> PackResult:
    """One pack run under the output's lock; `run_units(units, settings, piece_bytes)` is the
    chosen executor (packing.executors), which yields each task's result in task order."""
    tok = load_tokenizer(m.tokenizer)
    tok_hash = tokenizer_hash(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos_id = None
    if m.separator == "eos":
        eos_id = tok.token_to_id(EOS_TOKEN)
        if eos_id is None:
            raise QovaryxDataError(f"{m.tokenizer}: the tokenizer has no {EOS_TOKEN} token, needed "
                                   f"by `separator: eos`; use a train-bpe tokenizer or "
                                   f"`separator: none`")
    inputs, files = resolve_sources(m)            # globs and stats: "up to date" reads nothing
    fingerprint = inputs_fingerprint(m, tok_hash, files, inputs)
    splits = ["train", "val"] if m.validation > 0 else [""]
    folders = {s: out_dir / s if s else out_dir for s in splits}
    result = PackResult(out_dir, folders, up_to_date=True)

    if (all(is_complete(f, fingerprint) for f in folders.values())
            and image_files_unchanged(folders.values())):
        shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)  # killed just before its cleanup
        infos = [read_dataset_json(f) for f in folders.values()]
        result.documents = sum(i["num_documents"] for i in infos)
        result.tokens = sum(i["num_tokens"] for i in infos)
        result.skipped = infos[0]["skipped"]
        result.seconds = time.perf_counter() - t0
        return result
    result.up_to_date = False
    configs, units = plan_inputs(m, inputs)
    _check_decision_labels(m, configs)   # after plan_inputs: hf ClassLabel names are filled in there
    has_images = any(c.image_field for c in configs)
    image_spec = m.image_spec() if has_images else None

    work = out_dir / WORK_DIR
    prepare_work_dir(work, fingerprint)
    drop_parts_with_changed_images(work)
    max_id = max_token_id(tok)
    dtype = token_dtype(max_id + 1)    # the largest id possible, not the count (ids may be sparse)
    settings = PackSettings(m.tokenizer, tuple(configs), m.on_error, eos_id, m.min_tokens,
                            m.validation, dtype_name(dtype), image_spec, str(work))
    _remove_other_layout(out_dir, splits)
    for f in folders.values():  # an older, different dataset here is no longer complete
        f.mkdir(parents=True, exist_ok=True)
        (f / DATASET_JSON).unlink(missing_ok=True)

    writers = {s: DatasetWriter(folders[s], dtype, m.shard_tokens, image_spec, len(configs))
               for s in splits}
    skipped: Counter = Counter()
    samples: list[dict] = []
    file_ids: dict[str, int] = {}
    image_files: dict[str, list] = {}   # path -> [path, size, mtime_ns], first read in unit order
    streamed = any(u.stream for u in units)   # their pieces are counted as they are decoded
    bar = _progress_bar(None if streamed else len(units), progress)
    docs_total = tokens_total = 0
    source_skips = [Counter() for _ in configs]
    lines = _LineNumbers()
    try:
        for key, _, status, payload in run_units(units, settings, m.unit_bytes):
            unit = units[key[0]]
            cfg = configs[unit.source_index]
            delta = lines.delta(unit, cfg) if key[1] is None else 0
            if status == "error":
                raise rebuild_error(_shifted_error(payload, unit.path, delta))
            result.units += 1
            result.units_done += status == "ok"
            part = load_part(part_path(work, key), image_spec.shape if image_spec else None)
            meta = part["meta"]
            lines.advance(unit, cfg, meta["newlines"])
            part["row"] += delta
            skipped.update(meta["skipped"])
            source_skips[unit.source_index].update(meta["skipped"])
            room = SKIP_SAMPLE_LIMIT - len(samples)
            samples.extend(_shifted_sample(x, unit.path, delta)
                           for x in meta["samples"][:max(room, 0)])
            for path, size, mtime_ns in meta["image_files"]:
                image_files.setdefault(path, [path, size, mtime_ns])
            fids = np.array([file_ids.setdefault(p, len(file_ids)) for p in meta["files"]],
                            dtype=np.int32)
            for si, s in enumerate(splits):
                sel = part["split"] == si if len(splits) > 1 else slice(None)
                n_docs = writers[s].add(part, sel, fids, unit.source_index)
                docs_total += n_docs
            tokens_total += int(part["lengths"].sum())
            bar.update(1)
            bar.set_postfix_str(f"docs={docs_total:,} tokens={tokens_total:,} "
                                f"tok/s={tokens_total / max(time.perf_counter() - t0, 1e-9):,.0f}",
                                refresh=False)
        _check_empty_sources(configs, [sum(w.per_source[i]["documents"] for w in writers.values())
                                       for i in range(len(configs))], source_skips)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        bar.close()

    source_files = sorted(file_ids, key=file_ids.get)
    common = {
        "format": PACK_FORMAT_NAME, "format_version": PACK_FORMAT_VERSION,
        "created_by": f"qovaryx {_version()} (pack code {PACK_CODE_VERSION})",
        "name": m.name,
        "tokenizer": {"path": "tokenizer", "hash": tok_hash, "vocab_size": vocab_size,
                      "max_id": max_id,
                      "special_tokens": special_token_ids(tok)},
        "dtype": dtype_name(dtype),
        "separator": {"policy": m.separator, "eos_id": eos_id},
        "images": ({"shape": list(image_spec.shape), **image_spec.to_dict()}
                   if image_spec is not None else None),
        "decision": _decision_info(configs),
        "skipped": dict(sorted(skipped.items())),
        "skipped_sample": samples,
        "fingerprint": fingerprint,
        "manifest": {k: v for k, v in m.to_json().items() if k != "output"},
    }
    for s in splits:
        writers[s].finish(common, split=s or None, tokenizer_src=Path(m.tokenizer),
                          image_files=list(image_files.values()), source_files=source_files,
                          sources=[str(c.path) for c in configs])
    shutil.rmtree(work, ignore_errors=True)
    result.documents = docs_total
    result.tokens = tokens_total
    result.skipped = dict(sorted(skipped.items()))
    result.seconds = time.perf_counter() - t0
    return result


class _LineNumbers:
    """File line numbers for units planned without them (`plan_units(count_lines=False)`): a
    worker numbers the rows of its byte range from 1 and records the range's newlines; the
    assembler, which sees a file's ranges in order, adds the newlines of the ranges before."""

    def __init__(self) -> None:
        self.next_line: dict[str, int] = {}   # path -> line number where its next range starts

    def delta(self, unit, cfg) -> int:
        """Lines to add to the rows (and messages) of `unit`'s part."""
        if not is_line_range(unit, cfg):
            return 0
        if unit.first_row is not None:         # a file's first range is numbered at planning
            self.next_line[unit.path] = unit.first_row
            return 0
        return self.next_line[unit.path] - 1

    def advance(self, unit, cfg, newlines: int) -> None:
        if is_line_range(unit, cfg):
            self.next_line[unit.path] += newlines


def _shifted_error(payload: dict, path: str, delta: int) -> dict:
    if delta and payload.get("path") == path and payload.get("row") is not None:
        payload = {**payload, "row": payload["row"] + delta,
                   "message": shift_rows(payload["message"], path, delta)}
    return payload


def _shifted_sample(sample: dict, path: str, delta: int) -> dict:
    if delta and sample["path"] == path and sample["row"] is not None:
        sample = {**sample, "row": sample["row"] + delta,
                  "message": shift_rows(sample["message"], path, delta)}
    return sample


def _check_empty_sources(configs, documents: list[int], skips: list[Counter]) -> None:
    """A source that contributed no document is almost always a mistake (a wrong path, format,
    split or text_field): an error naming it, unless it says `allow_empty: true`."""
    for i, (c, n) in enumerate(zip(configs, documents)):
        if n == 0 and not c.allow_empty:
            rows = ", ".join(f"{r} {why}" for why, r in sorted(skips[i].items()))
            raise SourceError(
                f"sources[{i}] ({c.path}): the source yields no documents "
                f"({'rows skipped: ' + rows if rows else 'no rows at all'}); check its path, "
                f"format, split and text_field, or set `allow_empty: true` on the source if an "
                f"empty source is expected", path=str(c.path), reason="empty_source")


def _remove_other_layout(out_dir: Path, splits: list[str]) -> None:
    """An earlier pack into `out_dir` with(out) a validation split left the other layout
    (one dataset, or train/ + val/): remove it so that readers never open the stale one."""
    if splits == [""]:
        for s in ("train", "val"):
            if (out_dir / s / DATASET_JSON).is_file():
                shutil.rmtree(out_dir / s)
    elif (out_dir / DATASET_JSON).is_file():
        (out_dir / DATASET_JSON).unlink()
        (out_dir / IMAGE_FILES).unlink(missing_ok=True)
        (out_dir / SOURCE_FILES).unlink(missing_ok=True)
        for p in out_dir.glob("shard-*"):
            if SHARD_FILE.fullmatch(p.name) and p.is_file():
                p.unlink()
        shutil.rmtree(out_dir / "tokenizer", ignore_errors=True)


def _version() -> str:
    from qovaryx_data import __version__

    return __version__


def _check_decision_labels(m: PackManifest, configs) -> None:
    """All sources that name their classes must name them identically, in the same order.

    Each source maps a label name to its index in its own ``decision_labels``, and the dataset
    records one list of names: [hold, buy] in one source and [buy, hold] in another would store
    "buy" as 1 and as 0 under one name. A source without names gives class ids directly; they
    are read with the other sources' names."""
    first = None
    for i, c in enumerate(configs):
        if c.decision_field is None or c.decision_labels is None:
            continue
        if first is None:
            first = i
        elif tuple(c.decision_labels) != tuple(configs[first].decision_labels):
            a, b = configs[first], c
            raise ManifestError(
                f"manifest {m.name!r}: sources[{first}] ({a.path}) has decision_labels "
                f"{list(a.decision_labels)} but sources[{i}] ({b.path}) has "
                f"{list(b.decision_labels)}; a packed dataset has one list of class names (a label "
                f"is stored as its index in its source's list), so give every source the same "
                f"decision_labels in the same order")


def _decision_info(configs) -> dict | None:
    if not any(c.decision_field for c in configs):
        return None
    names = next((list(c.decision_labels) for c in configs if c.decision_labels), None)
    return {"num_classes": NUM_DECISION_CLASSES, "labels": names}


def _progress_bar(total: int | None, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="unit", desc="pack", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)
