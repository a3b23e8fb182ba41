"""Planning a pack run: the work units, the fingerprint of the inputs, "up to date", the lock.

`plan_inputs` resolves every manifest source to its files and cuts them into work units
(`sources.plan_units`); `inputs_fingerprint` hashes what decides the output (manifest, tokenizer
hash, files' sizes and mtimes, format and code version); `is_complete` and
`image_files_unchanged` decide whether an earlier pack is still up to date. `OutputLock` keeps a
second pack out of the same folder, and `refuse_foreign_output` refuses a folder that holds
someone else's files. Nothing here reads the rows or writes a shard.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.fileio import atomic_write, stat_pair
from qovaryx_data.format import (IMAGE_FILES, IMAGE_FILES_FORMAT, IMAGE_FILES_VERSION,
                                 PACK_FORMAT_NAME, PACK_FORMAT_VERSION, SOURCE_FILES)
from qovaryx_data.manifest import DATASET_JSON, PackManifest, read_dataset_json


PACK_CODE_VERSION = 3          # bump when the packer's output for the same inputs changes
WORK_DIR = ".work"
LOCK_FILE = ".pack.lock"


class PackLockedError(QovaryxDataError):
    """Another pack run holds the output folder's lock."""


# What a pack writes into its output folder, and the only names it ever replaces or deletes there.
OWN_NAMES = (DATASET_JSON, "shard-NNNNN.{tok,idx,meta.arrow,img}", IMAGE_FILES, SOURCE_FILES,
             "tokenizer/", "train/", "val/", WORK_DIR + "/", LOCK_FILE)


def refuse_foreign_output(out_dir: Path) -> None:
    """A non-empty folder with no trace of a pack (dataset.json, .work, the lock) is someone
    else's: packing there could replace files of theirs, so ask for --force."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    marks = [out_dir / DATASET_JSON, out_dir / WORK_DIR, out_dir / LOCK_FILE,
             out_dir / "train" / DATASET_JSON, out_dir / "val" / DATASET_JSON]
    if any(p.exists() for p in marks):
        return
    raise QovaryxDataError(
        f"{out_dir}: the output folder is not empty ({folder_listing(out_dir)}) and holds no earlier "
        f"pack (no {DATASET_JSON}, {WORK_DIR}/ or {LOCK_FILE}); pack into a new or empty folder "
        f"(--out), or pass --force (pack(force=True)) to pack there anyway: pack then writes and "
        f"replaces only its own names ({', '.join(OWN_NAMES)}) and leaves every other file alone")


def folder_listing(folder: Path) -> str:
    """The first five names in a folder, and how many there are when more: for error messages."""
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class OutputLock:
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


@dataclass(frozen=True)
class PackSettings:
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


def resolve_sources(m: PackManifest) -> tuple[list[list[Path]], list[list]]:
    """Each source's input files (globbed once), and ``[path, size, mtime_ns]`` of every file
    under them: what the fingerprint needs. Stats only, nothing is read, so deciding that a pack
    is up to date costs O(files) stats."""
    from qovaryx_data import sources

    base = Path(m.base_dir)
    inputs = [sources.resolve_inputs(spec.path, base, spec.format) for spec in m.sources]
    return inputs, [entry for found in inputs for f in found for entry in _stat_tree(f)]


def plan_inputs(m: PackManifest, inputs: list[list[Path]]) -> tuple[list, list]:
    """The effective source configs (hf Image()/ClassLabel columns filled in) and the work units.
    Line numbers are not counted here (the workers count each unit's newlines), so planning
    reads only the few bytes around each cut (and parquet / hf metadata)."""
    from qovaryx_data import sources

    base = Path(m.base_dir)
    configs, units = [], []
    for i, (spec, files) in enumerate(zip(m.sources, inputs)):
        cfg = sources.effective_config(spec, base, files=files)
        configs.append(cfg)
        units.extend(sources.plan_units(cfg, i, base, m.unit_bytes, m.unit_rows, files=files,
                                        count_lines=False))
    return configs, units


def _stat_tree(p: Path) -> list[list]:
    paths = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    return [[str(q), *stat_pair(str(q))] for q in paths]


def inputs_fingerprint(m: PackManifest, tok_hash: str, files: list,
                       inputs: list[list[Path]]) -> str:
    """xxh3-128 of what decides the output: the manifest (without `output`), the tokenizer hash,
    every input file's path, size and mtime, the format and code versions (and Pillow's version
    when rows may carry images). From file stats alone: no input is read."""
    man = m.to_json()
    man.pop("output", None)  # where the output goes does not change what it holds
    # Stored pixels come from Pillow's decoders and resamplers, whose output may change between
    # releases: a pack that may hold images (an image_field, or an hf folder, whose Image()
    # column is found on its own) is redone under another Pillow.
    pillow = None
    if any(spec.image_field or any(f.is_dir() for f in found)
           for spec, found in zip(m.sources, inputs)):
        import PIL

        pillow = PIL.__version__
    blob = json.dumps({"format": PACK_FORMAT_NAME, "format_version": PACK_FORMAT_VERSION,
                       "pack_code_version": PACK_CODE_VERSION, "manifest": man, "pillow": pillow,
                       "tokenizer_hash": tok_hash, "files": files}, sort_keys=True)
    return xxhash.xxh3_128_hexdigest(blob.encode())


def is_complete(folder: Path, fingerprint: str) -> bool:
    try:
        info = read_dataset_json(folder)
    except QovaryxDataError:
        return False
    if info.get("fingerprint") != fingerprint:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == f["bytes"]
               for name, f in info["files"].items())


def image_files_unchanged(folders) -> bool:
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
    return all(stat_pair(p) == st for p, st in recorded.items())


def prepare_work_dir(work: Path, fingerprint: str) -> None:
    """Keep the finished units of an interrupted run with the same fingerprint, else start empty."""
    stamp = work / "fingerprint"
    if work.exists() and not (stamp.is_file() and stamp.read_text().strip() == fingerprint):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not stamp.is_file():
        atomic_write(stamp, fingerprint + "\n")
