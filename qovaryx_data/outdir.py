"""The output folder of a command that writes a whole dataset (merge, import): the same rules as
pack's (docs/FORMAT.md "How a pack runs" 5): a non-empty folder that holds no earlier dataset is
refused unless forced, an older dataset there stops being complete before anything is written
(its dataset.json goes first), and a complete dataset with the same fingerprint is up to date.
"""
from __future__ import annotations

import os
from pathlib import Path

import xxhash

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.manifest import DATASET_JSON, read_dataset_json
from qovaryx_data.packing.plan import folder_listing


def fingerprint_of(kind: str, *parts: object) -> str:
    """xxh3-128 of a command name and its inputs (strings, numbers), in order.

        >>> fingerprint_of("merge", "a" * 32, "b" * 32) == fingerprint_of("merge", "a" * 32, "b" * 32)
        True
    """
    h = xxhash.xxh3_128(f"qovaryx-{kind}\n".encode())
    for p in parts:
        h.update(str(p).encode("utf-8") + b"\n")
    return h.hexdigest()


def up_to_date(folder: Path, fingerprint: str) -> bool:
    """A complete dataset in `folder` with this fingerprint and every listed file at its size."""
    try:
        info = read_dataset_json(folder)
    except QovaryxDataError:
        return False
    return info.get("fingerprint") == fingerprint and all(
        (folder / n).is_file() and (folder / n).stat().st_size == f["bytes"]
        for n, f in info["files"].items())


def prepare_output(out: str | os.PathLike, *, force: bool, command: str,
                   inputs: tuple[Path, ...] = ()) -> Path:
    """Resolve and create `out` for `command`; refuse an input as output and a non-empty folder
    holding no earlier dataset (unless `force`); remove an earlier dataset.json (so a run
    stopped half-way leaves an incomplete folder, never a stale complete one)."""
    out = Path(out).resolve()
    for p in inputs:
        if Path(p).resolve() == out:
            raise QovaryxDataError(f"{out}: the output is also an input of {command}; "
                                   f"write to a new folder (--out)")
    if out.is_dir() and any(out.iterdir()) and not force:
        if not any((out / s / DATASET_JSON).exists() for s in ("", "train", "val")):
            raise QovaryxDataError(
                f"{out}: the output folder is not empty ({folder_listing(out)}) and holds no dataset; write to a "
                f"new or empty folder (--out), or pass --force to write there anyway ({command} "
                f"then writes only dataset.json, shard-NNNNN.*, source_files.json, "
                f"image_files.json, tokenizer/, train/ and val/, and leaves other files alone)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def invalidate(folder: Path) -> None:
    """Make a dataset in `folder` incomplete before rewriting it: dataset.json goes first."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATASET_JSON).unlink(missing_ok=True)
