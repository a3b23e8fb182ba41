"""The pack-once compiler: a manifest's sources -> a packed dataset (docs/FORMAT.md).

Two stages, so that the output never depends on the number of workers:

1. **Map.** Sources are cut into fixed-size work units (`sources.plan_units`). A process pool
   tokenizes each unit (`encode_batch_fast`, one thread per process) and writes it atomically to
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

    >>> pack("manifests/shakespeare.yaml", workers=2)           # doctest: +SKIP
    PackResult(out=PosixPath('build/packed/shakespeare'), up_to_date=False, documents=42, ...)
"""
from __future__ import annotations

import fcntl
import functools
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from qovaryx_data.errors import ImageError, ManifestError, QovaryxDataError, SourceError
from qovaryx_data.fileio import atomic_write, temp_name
from qovaryx_data.format import (FORMAT_NAME, FORMAT_VERSION, HEADER_SIZE, META_COLUMNS,
                                 dtype_name, file_entry, meta_schema, pack_header, padded,
                                 token_dtype)
from qovaryx_data.manifest import (DATASET_JSON, PackManifest, load_manifest,
                                   read_dataset_json, write_dataset_json, write_json_atomic)
from qovaryx_data.sources import NUM_DECISION_CLASSES
from qovaryx_data.tokenizer import (EOS_TOKEN, TOKENIZER_FILE, TOKENIZER_FILES, load_tokenizer,
                                    max_token_id, special_token_ids, tokenizer_hash)

PACK_CODE_VERSION = 2          # bump when the packer's output for the same inputs changes
SKIP_SAMPLE_LIMIT = 100        # (file, row, reason) examples kept in dataset.json
WORK_DIR = ".work"
LOCK_FILE = ".pack.lock"
IMAGE_FILES = "image_files.json"    # (path, size, mtime_ns) of every image file a pack read
IMAGE_FILES_FORMAT = "qovaryx-image-files"
IMAGE_FILES_VERSION = 1
# forkserver: workers fork from a clean server (no inherited locks, threads or tokenizer state)
MP_START = os.environ.get("QOVARYX_MP_START",
                          "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")


class PackLockedError(QovaryxDataError):
    """Another pack run holds the output folder's lock."""


@dataclass
class PackResult:
    out: Path                       # the output folder
    datasets: dict[str, Path]       # split name ("" without validation) -> dataset folder
    up_to_date: bool                # True: nothing was done
    documents: int = 0              # all splits
    tokens: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    units: int = 0                  # work units in the plan
    units_done: int = 0             # units tokenized by this run (the rest were resumed)
    seconds: float = 0.0


# ============================================================================ entry point

def pack(manifest: PackManifest | str | os.PathLike, *, out: str | os.PathLike | None = None,
         workers: int | None = None, progress: bool = True, force: bool = False) -> PackResult:
    """Compile `manifest` into a packed dataset under `out` (default: the manifest's `output`).

    Idempotent (same inputs: returns with ``up_to_date=True``), resumable (finished units are
    kept in ``<out>/.work``), byte-identical for any `workers`. Raises SourceError for a bad row
    with ``on_error: fail``, PackLockedError when another pack writes the same output, and
    QovaryxDataError for a non-empty `out` that holds no earlier pack unless `force` (even then
    only pack's own names are ever replaced or deleted there: see OWN_NAMES).
    """
    t0 = time.perf_counter()
    m = manifest if isinstance(manifest, PackManifest) else load_manifest(manifest)
    if out is None and m.output is None:
        raise QovaryxDataError(f"manifest {m.name!r} has no `output:`; give --out DIR")
    out_dir = Path(out if out is not None else m.output).resolve()
    if not force:
        _refuse_foreign_output(out_dir)
    workers = max(1, workers or _usable_cores())
    out_dir.mkdir(parents=True, exist_ok=True)
    with _Lock(out_dir / LOCK_FILE):
        return _pack_locked(m, out_dir, workers, progress, t0)


# What a pack writes into its output folder, and the only names it ever replaces or deletes there.
OWN_NAMES = (DATASET_JSON, "shard-NNNNN.{tok,idx,meta.arrow,img}", IMAGE_FILES, "tokenizer/",
             "train/", "val/", WORK_DIR + "/", LOCK_FILE)
_SHARD_FILE = re.compile(r"shard-\d{5}\.(tok|idx|meta\.arrow|img)")
_OWN_TEMP = re.compile(r"\.(shard-\d{5}\.(tok|idx|meta\.arrow|img)\.tmp|"
                       r"(dataset|image_files)\.json\.tmp-\d+)")


def _refuse_foreign_output(out_dir: Path) -> None:
    """A non-empty folder with no trace of a pack (dataset.json, .work, the lock) is someone
    else's: packing there could replace files of theirs, so ask for --force."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    marks = [out_dir / DATASET_JSON, out_dir / WORK_DIR, out_dir / LOCK_FILE,
             out_dir / "train" / DATASET_JSON, out_dir / "val" / DATASET_JSON]
    if any(p.exists() for p in marks):
        return
    names = sorted(p.name for p in out_dir.iterdir())
    some = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    raise QovaryxDataError(
        f"{out_dir}: the output folder is not empty ({some}) and holds no earlier "
        f"pack (no {DATASET_JSON}, {WORK_DIR}/ or {LOCK_FILE}); pack into a new or empty folder "
        f"(--out), or pass --force (pack(force=True)) to pack there anyway: pack then writes and "
        f"replaces only its own names ({', '.join(OWN_NAMES)}) and leaves every other file alone")


def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Lock:
    """An exclusive, non-blocking flock on a file inside the output; released by the OS on death."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise PackLockedError(f"{self.path.parent}: another `qovaryx-data pack` is writing this "
                                  f"output (lock {self.path} held by pid {holder}); wait for it to "
                                  f"finish or pack into another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing the descriptor releases the flock


# ============================================================================ planning

@dataclass(frozen=True)
class _Settings:
    """What a worker needs besides the unit; picklable, sent once per worker."""
    tokenizer_dir: str
    source_configs: tuple          # sources.SourceConfig per manifest source (hf fields filled)
    on_error: str
    eos_id: int | None             # appended after every document, None: no separator
    min_tokens: int
    validation: float
    dtype: str
    image_spec: Any                # images.ImageSpec or None
    work_dir: str


def _plan(m: PackManifest):
    from qovaryx_data import sources

    base = Path(m.base_dir)
    configs, units, files = [], [], []
    for i, spec in enumerate(m.sources):
        inputs = sources.resolve_inputs(spec.path, base, spec.format)   # globbed once per source
        cfg = sources.effective_config(spec, base, files=inputs)
        configs.append(cfg)
        units.extend(sources.plan_units(cfg, i, base, m.unit_bytes, m.unit_rows, files=inputs))
        for f in inputs:
            files.extend(_stat_tree(f))
    return configs, units, files


def _stat_tree(p: Path) -> list[list]:
    paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), *_stat_pair(str(q))] for q in paths]


def _fingerprint(m: PackManifest, tok_hash: str, files: list, configs: list) -> str:
    man = m.to_json()
    man.pop("output", None)  # where the output goes does not change what it holds
    # Stored pixels come from Pillow's decoders and resamplers, whose output may change between
    # releases: a pack with images is redone under another Pillow.
    pillow = None
    if any(c.image_field for c in configs):
        import PIL

        pillow = PIL.__version__
    blob = json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                       "pack_code_version": PACK_CODE_VERSION, "manifest": man, "pillow": pillow,
                       "effective_sources": [repr(c) for c in configs],
                       "tokenizer_hash": tok_hash, "files": files}, sort_keys=True)
    return xxhash.xxh3_128_hexdigest(blob.encode())


def _is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        info = read_dataset_json(folder)
    except QovaryxDataError:
        return False
    if info.get("fingerprint") != fingerprint:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == f["bytes"]
               for name, f in info["files"].items())


# ============================================================================ the pack run

def _pack_locked(m: PackManifest, out_dir: Path, workers: int, progress: bool,
                 t0: float) -> PackResult:
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
    configs, units, files = _plan(m)
    _check_decision_labels(m, configs)   # after _plan: hf ClassLabel names are filled in there
    has_images = any(c.image_field for c in configs)
    image_spec = m.image_spec() if has_images else None
    fingerprint = _fingerprint(m, tok_hash, files, configs)
    splits = ["train", "val"] if m.validation > 0 else [""]
    folders = {s: out_dir / s if s else out_dir for s in splits}
    result = PackResult(out_dir, folders, up_to_date=True, units=len(units))

    if (all(_is_complete(f, fingerprint) for f in folders.values())
            and _image_files_unchanged(folders.values())):
        shutil.rmtree(out_dir / WORK_DIR, ignore_errors=True)  # killed just before its cleanup
        infos = [read_dataset_json(f) for f in folders.values()]
        result.documents = sum(i["num_documents"] for i in infos)
        result.tokens = sum(i["num_tokens"] for i in infos)
        result.skipped = infos[0]["skipped"]
        result.seconds = time.perf_counter() - t0
        return result
    result.up_to_date = False

    work = out_dir / WORK_DIR
    _prepare_work_dir(work, fingerprint)
    _drop_parts_with_changed_images(work)
    max_id = max_token_id(tok)
    dtype = token_dtype(max_id + 1)    # the largest id possible, not the count (ids may be sparse)
    settings = _Settings(m.tokenizer, tuple(configs), m.on_error, eos_id, m.min_tokens,
                         m.validation, dtype_name(dtype), image_spec, str(work))
    _remove_other_layout(out_dir, splits)
    for f in folders.values():  # an older, different dataset here is no longer complete
        f.mkdir(parents=True, exist_ok=True)
        (f / DATASET_JSON).unlink(missing_ok=True)

    writers = {s: _DatasetWriter(folders[s], dtype, m.shard_tokens, image_spec, len(configs))
               for s in splits}
    skipped: Counter = Counter()
    samples: list[dict] = []
    file_ids: dict[str, int] = {}
    image_files: dict[str, list] = {}   # path -> [path, size, mtime_ns], first read in unit order
    bar = _progress_bar(len(units), progress)
    docs_total = tokens_total = 0
    source_skips = [Counter() for _ in configs]
    try:
        for k, stats in _run_units(units, settings, workers):
            if stats["ran"]:
                result.units_done += 1
            part = _load_part(_part_path(work, k), image_spec.shape if image_spec else None)
            meta = part["meta"]
            skipped.update(meta["skipped"])
            source_skips[units[k].source_index].update(meta["skipped"])
            room = SKIP_SAMPLE_LIMIT - len(samples)
            samples.extend(meta["samples"][:max(room, 0)])
            for path, size, mtime_ns in meta["image_files"]:
                image_files.setdefault(path, [path, size, mtime_ns])
            fids = np.array([file_ids.setdefault(p, len(file_ids)) for p in meta["files"]],
                            dtype=np.int32)
            for si, s in enumerate(splits):
                sel = part["split"] == si if len(splits) > 1 else slice(None)
                n_docs = writers[s].add(part, sel, fids, units[k].source_index)
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
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
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
        "source_files": source_files,
        "skipped": dict(sorted(skipped.items())),
        "skipped_sample": samples,
        "fingerprint": fingerprint,
        "manifest": {k: v for k, v in m.to_json().items() if k != "output"},
    }
    for s in splits:
        writers[s].finish(common, split=s or None, tokenizer_src=Path(m.tokenizer),
                          image_files=list(image_files.values()),
                          sources=[str(c.path) for c in configs])
    shutil.rmtree(work, ignore_errors=True)
    result.documents = docs_total
    result.tokens = tokens_total
    result.skipped = dict(sorted(skipped.items()))
    result.seconds = time.perf_counter() - t0
    return result


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
        for p in out_dir.glob("shard-*"):
            if _SHARD_FILE.fullmatch(p.name) and p.is_file():
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


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="unit", desc="pack", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


def _prepare_work_dir(work: Path, fingerprint: str) -> None:
    """Keep the finished units of an interrupted run with the same fingerprint, else start empty."""
    stamp = work / "fingerprint"
    if work.exists() and not (stamp.is_file() and stamp.read_text().strip() == fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write(stamp, fingerprint + "\n")


def _part_path(work: Path, k: int) -> Path:
    return work / f"unit-{k:06d}.npz"


def _run_units(units, settings: _Settings, workers: int):
    """Yield (unit index, stats) in unit order; units with a finished part are not redone."""
    work = Path(settings.work_dir)
    pending = [k for k in range(len(units)) if not _part_path(work, k).is_file()]
    if workers <= 1 or len(pending) <= 1:
        _init_worker(settings, in_process=True)
        results = ((k, _process_unit((k, units[k]))) for k in pending)
    else:
        results = _pool_results(units, pending, settings, workers)
    try:
        todo = set(pending)
        for k in range(len(units)):
            if k in todo:
                k_ran, (status, payload) = next(results)
                assert k_ran == k, (k_ran, k)
                if status == "error":
                    raise _rebuild_error(payload)
                yield k, {"ran": True, **payload}
            else:
                yield k, {"ran": False}
    finally:
        results.close()   # stops the pool (and its workers) when the run ends early


IN_FLIGHT_PER_WORKER = 2   # units submitted ahead per worker: workers stay busy, memory bounded


def _pool_results(units, pending: list[int], settings: _Settings, workers: int):
    """Yield (k, _process_unit result) for the `pending` units in order, from a process pool.

    concurrent.futures notices a worker that dies (killed, out of memory): every unfinished unit
    then fails with BrokenProcessPool, turned here into PackWorkerError. At most
    IN_FLIGHT_PER_WORKER units per worker are submitted ahead of the one being waited for."""
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context(MP_START)
    if MP_START == "forkserver":
        ctx.set_forkserver_preload(["qovaryx_data.packer"])
    n = min(workers, len(pending))
    pool = ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(settings,))
    todo = iter(pending)
    in_flight: deque = deque()

    def submit() -> None:
        k = next(todo, None)
        if k is not None:
            in_flight.append((k, pool.submit(_process_unit, (k, units[k]))))

    finished = False
    k = pending[0]
    try:
        for _ in range(IN_FLIGHT_PER_WORKER * n):
            submit()
        while in_flight:
            k, fut = in_flight.popleft()
            submit()
            result = fut.result()
            yield k, result
        finished = True
    except BrokenProcessPool:   # raised by result() or submit() once a worker has died
        raise _worker_died(pool, units[k], k, Path(settings.work_dir)) from None
    finally:
        _stop_pool(pool, graceful=finished)


class PackWorkerError(QovaryxDataError):
    """A worker process of the pack died (killed by a signal, out of memory, a crash)."""


def _worker_died(pool, unit, k: int, work: Path) -> PackWorkerError:
    import signal

    codes = {p.exitcode for p in (pool._processes or {}).values()   # noqa: SLF001
             if p.exitcode not in (None, 0)}
    if len(codes) > 1:   # the pool SIGTERMs the survivors once one worker died: not the cause
        codes.discard(-signal.SIGTERM)
    how = ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 and -c in signal.valid_signals()
                    else f"exit status {c}" for c in sorted(codes)) or "it exited unexpectedly"
    return PackWorkerError(
        f"a pack worker process died ({how}) with units still being tokenized (the next one "
        f"due: unit {k}, {unit.path} [{unit.start}, {unit.end})); the pack stopped. A worker "
        f"killed by SIGKILL is often the out-of-memory killer: lower --workers, or give the "
        f"machine more memory. Finished units are kept in {work}: re-run the same pack to resume "
        f"from them")


def _stop_pool(pool, graceful: bool) -> None:
    """Shut the pool down; after an error or an interrupt, kill its workers instead of waiting
    for their units to finish."""
    procs = list((pool._processes or {}).values())   # noqa: SLF001 - no public handle in 3.11
    manager = pool._executor_manager_thread          # noqa: SLF001 - shutdown() forgets it
    if graceful:
        pool.shutdown(wait=True)
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join()
    # Wait for the pool's manager thread too: it closes its wake-up pipe on the way out, and
    # CPython 3.11's exit hook (concurrent.futures.process._python_exit) writes to that pipe
    # without a lock. Left running, the two race, and the CLI's clear error is followed by a
    # "Bad file descriptor" traceback at exit.
    if manager is not None:
        manager.join(timeout=60)


def _rebuild_error(payload: dict) -> Exception:
    """Worker exceptions travel as plain data (keyword-only attributes do not pickle)."""
    import importlib

    cls = getattr(importlib.import_module(payload["module"]), payload["cls"])
    return cls(payload["message"], path=payload["path"], row=payload["row"],
               reason=payload["reason"])


# ============================================================================ worker side

_W: dict[str, Any] = {}


def _init_worker(settings: _Settings, in_process: bool = False) -> None:
    if not in_process:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
        _die_with_parent()
    tok = load_tokenizer(settings.tokenizer_dir)
    tok.encode_special_tokens = True   # "<|endoftext|>" inside a document is text, not a separator
    _W.clear()
    _W.update(settings=settings, tok=tok, dtype=np.dtype(settings.dtype))


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when its parent dies (a killed pack leaves no orphans)."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:          # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


def _process_unit(arg) -> tuple[str, dict]:
    k, unit = arg
    try:
        return "ok", _tokenize_unit(k, unit)
    except SourceError as e:
        return "error", {"module": type(e).__module__, "cls": type(e).__name__,
                         "message": str(e), "path": e.path, "row": e.row, "reason": e.reason}


CHUNK_ROWS = 4096               # rows tokenized per encode_batch call inside a unit
CHUNK_PIXEL_BYTES = 64 << 20   # ... or fewer, once their decoded images reach this many bytes


def _tokenize_unit(k: int, unit) -> dict:
    """Read, tokenize and store one unit as a part (unit-K.npz, plus unit-K.pix with its pixels);
    returns its counts. Rows are handled in chunks, so a worker holds at most one chunk of
    decoded images; pixels go straight to disk."""
    from qovaryx_data.sources import Skipped, iter_unit

    s: _Settings = _W["settings"]
    cfg = s.source_configs[unit.source_index]
    part = _UnitPart(_part_path(Path(s.work_dir), k), s)
    chunk, chunk_bytes = [], 0
    for item in iter_unit(unit, cfg, s.on_error):
        if isinstance(item, Skipped):
            part.record(item.path, item.row, item.reason, item.message)
            continue
        pixels = digest = None
        if item.image is not None:
            try:
                pixels, digest = _load_image(item, s.image_spec, part.note_image_file)
            except SourceError as e:
                if s.on_error != "skip":
                    raise
                part.record(e.path or item.path, item.row if e.row is None else e.row, e.reason,
                            str(e))
                continue
            chunk_bytes += pixels.nbytes
        chunk.append((item, pixels, digest))
        if len(chunk) >= CHUNK_ROWS or chunk_bytes >= CHUNK_PIXEL_BYTES:
            part.add_rows(chunk)
            chunk, chunk_bytes = [], 0
    part.add_rows(chunk)
    return part.finish(k)


class _UnitPart:
    """The documents of one work unit, collected chunk by chunk and written as a part."""

    def __init__(self, path: Path, settings: _Settings):
        self.path, self.s = path, settings
        self.pix_path = path.with_suffix(".pix")
        self.pix_tmp = temp_name(self.pix_path)   # streamed into, renamed by finish()
        self.pix_file = None
        self.skipped: Counter = Counter()
        self.samples: list[dict] = []
        self.file_ids: dict[str, int] = {}
        self.image_files: dict[str, list] = {}    # image file read -> [path, size, mtime_ns]
        self.ids: list[list[int]] = []
        self.cols: dict[str, list] = {c: [] for c in ("split", "row", "file_id", "decision",
                                                       "position", "has_image")}
        self.val_cut = int(settings.validation * 2 ** 64)

    def note_image_file(self, path: str, stat_pair: tuple[int, int] | None = None) -> None:
        """Record an image file's (size, mtime_ns), taken before it was read (or stat it now)."""
        if path not in self.image_files:
            self.image_files[path] = [path, *(stat_pair or _stat_pair(path))]

    def record(self, path, row, reason, message) -> None:
        self.skipped[reason] += 1
        if len(self.samples) < SKIP_SAMPLE_LIMIT:
            self.samples.append({"path": path, "row": row, "reason": reason, "message": message})

    def add_rows(self, chunk: list) -> None:
        """Tokenize a chunk of (Row, pixels, source digest) (no image: None, None), check it,
        keep its documents."""
        if not chunk:
            return
        s = self.s
        encs = _W["tok"].encode_batch_fast([r.text for r, _, _ in chunk], add_special_tokens=False)
        for (r, pixels, digest), enc in zip(chunk, encs):
            ids = enc.ids
            n_text = len(ids)
            if pixels is None and r.decision is None and n_text < s.min_tokens:
                self.record(r.path, r.row, "too_short", f"{r.path} row {r.row}: {n_text} "
                            f"tokens, fewer than min_tokens = {s.min_tokens}")
                continue
            if s.eos_id is not None:
                ids.append(s.eos_id)
            pos = -1
            if r.decision is not None:
                pos = len(ids) - 1 if r.decision_position is None else r.decision_position
                if not 0 <= pos < (len(ids) if r.decision_position is None else n_text):
                    e = SourceError(_bad_position_message(r, n_text), path=r.path, row=r.row,
                                    reason="bad_position")
                    if s.on_error != "skip":
                        raise e
                    self.record(r.path, r.row, e.reason, str(e))
                    continue
            # The train/val side hashes what the user gave (text, the image's encoded bytes, the
            # label), never the decoded pixels: changing `images:` must not move rows across.
            h = xxhash.xxh3_64(r.text.encode("utf-8", "surrogatepass"))
            if pixels is not None:
                h.update(digest)
                if self.pix_file is None:
                    self.pix_file = open(self.pix_tmp, "wb")
                self.pix_file.write(pixels.tobytes())
            if r.decision is not None:
                h.update(bytes([r.decision]))
            self.ids.append(ids)
            c = self.cols
            c["split"].append(1 if h.intdigest() < self.val_cut else 0)
            c["row"].append(r.row)
            c["file_id"].append(self.file_ids.setdefault(r.path, len(self.file_ids)))
            c["decision"].append(-1 if r.decision is None else r.decision)
            c["position"].append(pos)
            c["has_image"].append(pixels is not None)

    def finish(self, k: int) -> dict:
        """Write the part atomically: pixels first, the .npz (the completion mark) last."""
        lengths = np.array([len(x) for x in self.ids], np.int64)
        total = int(lengths.sum())
        tokens = np.fromiter(chain.from_iterable(self.ids), dtype=_W["dtype"], count=total)
        if self.pix_file is not None:
            self.pix_file.close()
            os.replace(self.pix_tmp, self.pix_path)
        c = self.cols
        meta = {"unit": k, "files": list(self.file_ids), "skipped": dict(self.skipped),
                "image_files": list(self.image_files.values()),
                "samples": self.samples}
        arrays = dict(tokens=tokens, lengths=lengths, split=np.array(c["split"], np.uint8),
                      row=np.array(c["row"], np.int64), file_id=np.array(c["file_id"], np.int32),
                      decision=np.array(c["decision"], np.int8),
                      position=np.array(c["position"], np.int64),
                      has_image=np.array(c["has_image"], bool),
                      meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        _write_part(self.path, arrays)
        return {"documents": len(lengths), "tokens": total}


def _bad_position_message(r, n_text: int) -> str:
    """Why a labelled row has no token for the decision head to pool at, and the fix."""
    where = f"{r.path} row {r.row}"
    if r.decision_position is None:   # `decision_position: last` with no token at all
        return (f"{where}: the row has a decision label but no tokens (empty text with "
                f"`separator: none`), so there is no last token for the decision head to pool "
                f"at; give the row text, or use `separator: eos` (the default), which ends every "
                f"row with <|endoftext|>")
    if n_text == 0:
        return (f"{where}: decision position {r.decision_position} points into the row's text, "
                f"but the row has no text tokens; give the row text or fix the position field")
    return (f"{where}: decision position {r.decision_position} is outside the row's {n_text} "
            f"text tokens (0..{n_text - 1}); fix the position field or the text")


def _image_root(row) -> Path:
    """Image paths are relative to the source file's folder (an hf source: the folder itself)."""
    return _image_root_of(row.path)


@functools.lru_cache(maxsize=256)
def _image_root_of(path: str) -> Path:
    return Path(path).parent if Path(path).is_file() else Path(path)


def _stat_pair(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file; (-1, -1) when it is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _image_files_unchanged(folders) -> bool:
    """Every image file recorded by the packs in `folders` still has its size and mtime:
    O(image files) stats, no decoding. A missing or unreadable record counts as a change."""
    recorded: dict[str, tuple[int, int]] = {}
    for folder in folders:
        name = read_dataset_json(folder).get("image_files")
        if name is None:
            continue
        try:
            rec = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
            if (rec.get("format"), rec.get("version")) != (IMAGE_FILES_FORMAT, IMAGE_FILES_VERSION):
                return False
            recorded.update((p, (size, mtime_ns)) for p, size, mtime_ns in rec["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
    return all(_stat_pair(p) == st for p, st in recorded.items())


def _drop_parts_with_changed_images(work: Path) -> None:
    """A finished unit of an interrupted run whose image files changed since is redone."""
    for part in sorted(work.glob("unit-*.npz")):
        try:
            with np.load(part) as z:
                files = json.loads(z["meta"].tobytes())["image_files"]
        except Exception:  # noqa: BLE001 - unreadable: _load_part reports and deletes it
            continue
        if any(_stat_pair(p) != (size, mtime_ns) for p, size, mtime_ns in files):
            part.unlink()
            part.with_suffix(".pix").unlink(missing_ok=True)


def _load_image(row, spec, note_file) -> tuple[np.ndarray, bytes]:
    """The row's decoded pixels, and the xxh3-128 digest of its source image: the encoded bytes
    as given, or the file's bytes for a path (the same digest either way). A file is read once
    and `note_file(path, (size, mtime_ns))` records it (see IMAGE_FILES), even when it is
    missing, outside the source's folder or not a file (size -1 when absent)."""
    from qovaryx_data.images import ImageFile, load_image, read_image_file

    root = _image_root(row)
    where = f"{row.path} row {row.row}"
    value = row.image
    if isinstance(value, str):
        try:
            value = read_image_file(value, root=root, where=where, source=row.path, row=row.row)
        except ImageError:
            if row.image:
                note_file(os.path.realpath(os.path.join(root, row.image)))
            raise
        note_file(value.path, (value.size, value.mtime_ns))
    pixels = load_image(value, root=root, spec=spec, where=where, source=row.path, row=row.row)
    return pixels, xxhash.xxh3_128_digest(value.data if isinstance(value, ImageFile)
                                          else bytes(value))


def _write_part(path: Path, arrays: dict) -> None:
    def write(tmp: Path) -> None:   # no fsync: a part is cheap to redo (see _load_part)
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def _load_part(path: Path, image_shape) -> dict:
    """A finished part; its pixels (n_images, H, W, C) are memory-mapped from unit-K.pix."""
    try:
        with np.load(path) as z:
            part = {k: z[k] for k in z.files}
        part["meta"] = json.loads(part["meta"].tobytes())
        n_img = int(part["has_image"].sum())
        shape = (n_img, *(image_shape or (0, 0, 0)))
        part["pixels"] = (np.memmap(path.with_suffix(".pix"), np.uint8, "r", shape=shape)
                          if n_img else np.zeros(shape, np.uint8))
    except Exception as e:  # noqa: BLE001 - a part damaged by a crash (e.g. power loss)
        path.unlink(missing_ok=True)
        raise QovaryxDataError(f"{path}: a finished work unit is unreadable ({e}); it was "
                               f"deleted, re-run the pack to redo it") from None
    return part


# ============================================================================ assembling

def _meta_batch(cols: dict[str, np.ndarray]):
    """One record batch; a null slot holds -1 in the values buffer (readers may map the values
    without the validity bitmap: docs/FORMAT.md)."""
    import pyarrow as pa

    arrays = []
    for name, dt, nullable in META_COLUMNS:
        values = np.ascontiguousarray(cols[name], dtype=dt)
        validity = None
        if nullable and (values < 0).any():
            validity = pa.py_buffer(np.packbits(values >= 0, bitorder="little").tobytes())
        arrays.append(pa.Array.from_buffers(pa.from_numpy_dtype(dt), len(values),
                                            [validity, pa.py_buffer(values.tobytes())]))
    return pa.record_batch(arrays, schema=meta_schema())


class _ShardWriter:
    """One shard being written: .tok, .idx, .meta.arrow and (if any row has one) .img, temp names.

    Tokens, offsets and pixels are appended as they come; the metadata columns (a few bytes per
    document, bounded by the shard size) are kept until the shard closes and written as a single
    record batch, so readers map each column as one zero-copy array."""

    def __init__(self, folder: Path, index: int, dtype: np.dtype, image_shape):
        self.folder, self.index, self.dtype, self.image_shape = folder, index, dtype, image_shape
        self.stem = f"shard-{index:05d}"
        self.n_docs = 0
        self.n_tokens = 0
        self.n_images = 0
        self.tok = open(self._tmp(".tok"), "wb")
        self.tok.write(pack_header("tokens", dtype, 0))
        self.idx = open(self._tmp(".idx"), "wb")
        self.idx.write(pack_header("offsets", np.int64, 0))
        self.idx.write(np.zeros(1, "<i8").tobytes())
        self.img = None
        self.meta: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in META_COLUMNS}

    def _tmp(self, ext: str) -> Path:
        return self.folder / f".{self.stem}{ext}.tmp"

    def add(self, tokens: np.ndarray, lengths: np.ndarray, source: int, files: np.ndarray,
            rows: np.ndarray, decision: np.ndarray, position: np.ndarray,
            has_image: np.ndarray, pixels: np.ndarray) -> None:
        self.tok.write(tokens.astype(self.dtype, copy=False).tobytes())
        ends = self.n_tokens + np.cumsum(lengths, dtype=np.int64)
        self.idx.write(ends.astype("<i8").tobytes())
        img_index = np.full(len(lengths), -1, np.int32)
        if has_image.any():
            n = int(has_image.sum())
            img_index[has_image] = self.n_images + np.arange(n)
            if self.img is None:
                self.img = open(self._tmp(".img"), "wb")
                self.img.write(pack_header("images", np.uint8, 0, self.image_shape))
            item = int(np.prod(self.image_shape))
            pad = padded(item) - item
            flat = pixels.reshape(n, item)
            if pad:
                flat = np.concatenate([flat, np.zeros((n, pad), np.uint8)], axis=1)
            self.img.write(flat.tobytes())
            self.n_images += n
        for name, values in (("source", np.full(len(lengths), source, np.int16)),
                             ("file", files), ("row", rows), ("decision", decision),
                             ("decision_position", position), ("image", img_index)):
            self.meta[name].append(values)
        self.n_docs += len(lengths)
        self.n_tokens += int(lengths.sum())

    def close(self) -> dict:
        """Finish headers and padding, rename into place; returns the shard's dataset.json entry."""
        import pyarrow as pa

        _finish(self.tok, pack_header("tokens", self.dtype, self.n_tokens))
        _finish(self.idx, pack_header("offsets", np.int64, self.n_docs + 1))
        cols = {name: (np.concatenate(parts) if parts else np.zeros(0, dt))
                for (name, dt, _), parts in zip(META_COLUMNS, self.meta.values())}
        with pa.OSFile(str(self._tmp(".meta.arrow")), "wb") as sink:
            with pa.ipc.new_file(sink, meta_schema()) as w:
                w.write_batch(_meta_batch(cols))
        names = {"tokens": f"{self.stem}.tok", "offsets": f"{self.stem}.idx",
                 "meta": f"{self.stem}.meta.arrow", "images": None}
        os.replace(self._tmp(".tok"), self.folder / names["tokens"])
        os.replace(self._tmp(".idx"), self.folder / names["offsets"])
        os.replace(self._tmp(".meta.arrow"), self.folder / names["meta"])
        if self.img is not None:
            _finish(self.img, pack_header("images", np.uint8, self.n_images, self.image_shape))
            names["images"] = f"{self.stem}.img"
            os.replace(self._tmp(".img"), self.folder / names["images"])
        return {**names, "num_documents": self.n_docs, "num_tokens": self.n_tokens,
                "num_images": self.n_images}

    def abort(self) -> None:
        for f in (self.tok, self.idx, self.img):
            if f is not None:
                f.close()
        for ext in (".tok", ".idx", ".img", ".meta.arrow"):
            self._tmp(ext).unlink(missing_ok=True)


def _finish(f: io.BufferedWriter, header: bytes) -> None:
    """Pad the payload to 8 bytes, write the final header at offset 0, flush to disk, close."""
    size = f.tell()
    f.write(b"\0" * (padded(size - HEADER_SIZE) - (size - HEADER_SIZE)))
    f.seek(0)
    f.write(header)
    f.flush()
    os.fsync(f.fileno())
    f.close()


class _DatasetWriter:
    """Streams documents into the shards of one output dataset; documents never span shards."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, image_spec,
                 n_sources: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.image_shape = tuple(image_spec.shape) if image_spec is not None else (0, 0, 0)
        self.shards: list[dict] = []
        self.cur: _ShardWriter | None = None
        self.per_source = [{"documents": 0, "tokens": 0, "images": 0,
                            "decisions": [0] * NUM_DECISION_CLASSES}
                           for _ in range(n_sources)]
        self.n_multimodal = 0

    def add(self, part: dict, sel, fids: np.ndarray, source: int) -> int:
        """Append the documents of `part` selected by `sel`; returns how many."""
        lengths = part["lengths"][sel]
        n = len(lengths)
        if n == 0:
            return 0
        tokens = part["tokens"]
        if not isinstance(sel, slice):
            tokens = tokens[np.repeat(sel, part["lengths"])]   # the selected documents' tokens
        has_image = part["has_image"]
        img_rank = np.cumsum(has_image) - 1          # index of each row's pixels in the part
        cols = {"files": fids[part["file_id"]][sel], "rows": part["row"][sel],
                "decision": part["decision"][sel], "position": part["position"][sel],
                "has_image": has_image[sel], "img_rank": img_rank[sel]}
        st = self.per_source[source]
        st["documents"] += n
        st["tokens"] += int(lengths.sum())
        st["images"] += int(cols["has_image"].sum())
        dec = cols["decision"]
        counts = np.bincount(dec[dec >= 0], minlength=NUM_DECISION_CLASSES)
        assert len(counts) == NUM_DECISION_CLASSES, counts   # labels were checked when read
        st["decisions"] = [a + int(b) for a, b in zip(st["decisions"], counts)]
        self.n_multimodal += int((cols["has_image"] | (cols["decision"] >= 0)).sum())

        i, tok_pos = 0, 0
        cum = np.cumsum(lengths, dtype=np.int64)
        while i < n:
            if self.cur is None:
                self.cur = _ShardWriter(self.folder, len(self.shards), self.dtype, self.image_shape)
            room = self.shard_tokens - self.cur.n_tokens
            base = cum[i - 1] if i else 0
            # documents i..j-1 go in; the shard rolls after the document that reaches shard_tokens
            j = int(np.searchsorted(cum, base + room, side="left")) + 1
            j = min(max(j, i + 1), n)
            n_tok = int(cum[j - 1] - base)
            hi = cols["has_image"][i:j]
            self.cur.add(tokens[tok_pos:tok_pos + n_tok], lengths[i:j], source,
                         cols["files"][i:j], cols["rows"][i:j], cols["decision"][i:j],
                         cols["position"][i:j], hi, part["pixels"][cols["img_rank"][i:j][hi]])
            tok_pos += n_tok
            i = j
            if self.cur.n_tokens >= self.shard_tokens:
                self.shards.append(self.cur.close())
                self.cur = None
        return n

    def abort(self) -> None:
        if self.cur is not None:
            self.cur.abort()
            self.cur = None

    def finish(self, common: dict, *, split: str | None, tokenizer_src: Path,
               sources: list[str], image_files: list) -> None:
        if self.cur is not None and (self.cur.n_docs or not self.shards):
            self.shards.append(self.cur.close())
        elif self.cur is not None:
            self.cur.abort()
        self.cur = None
        if not self.shards:  # no documents at all: one empty shard keeps readers uniform
            self.cur = _ShardWriter(self.folder, 0, self.dtype, self.image_shape)
            self.shards.append(self.cur.close())
            self.cur = None
        _copy_tokenizer(tokenizer_src, self.folder / "tokenizer")
        _remove_stale(self.folder, self.shards)
        if image_files:
            write_json_atomic(self.folder / IMAGE_FILES,
                              {"format": IMAGE_FILES_FORMAT, "version": IMAGE_FILES_VERSION,
                               "files": image_files})
        else:
            (self.folder / IMAGE_FILES).unlink(missing_ok=True)
        files = {}
        for sh in self.shards:
            for key in ("tokens", "offsets", "meta", "images"):
                if sh[key]:
                    files[sh[key]] = file_entry(self.folder / sh[key])
        if image_files:
            files[IMAGE_FILES] = file_entry(self.folder / IMAGE_FILES)
        for p in sorted((self.folder / "tokenizer").iterdir()):
            files[f"tokenizer/{p.name}"] = file_entry(p)
        info = dict(common)
        info.update({
            "split": split,
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_multimodal_documents": self.n_multimodal,
            "num_images": sum(s["num_images"] for s in self.shards),
            "shard_tokens": self.shard_tokens,
            "sources": [{"path": p, **st} for p, st in zip(sources, self.per_source)],
            "shards": self.shards,
            "image_files": IMAGE_FILES if image_files else None,
            "files": files,
        })
        write_dataset_json(self.folder, info)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer's files of the folder (tokenizer.TOKENIZER_FILES: a model folder's
    weights and config are left behind), atomically: temp folder, then rename."""
    src = Path(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if src.is_dir():
        for name in sorted(TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    else:
        shutil.copyfile(src, tmp / TOKENIZER_FILE)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _remove_stale(folder: Path, shards: list[dict]) -> None:
    """Delete shard files of an older pack that this one does not list, and temp files of a run
    killed mid-write: only names a pack writes (shard-00012.tok, .shard-00012.tok.tmp, ...)."""
    keep = {v for sh in shards for k, v in sh.items() if k in ("tokens", "offsets", "meta", "images")
            and v}
    for p in folder.iterdir():
        if ((_SHARD_FILE.fullmatch(p.name) and p.name not in keep) or _OWN_TEMP.fullmatch(p.name)) \
                and p.is_file():
            p.unlink()
