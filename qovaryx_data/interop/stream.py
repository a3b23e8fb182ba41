"""What the format modules share: the `Batch` of whole documents a reader yields, cutting a
token stream at its end-of-text ids, reading a packed dataset in batches of whole documents,
and temp names for atomic writes."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Batch:
    """Whole documents read from a foreign file, in order."""
    files: np.ndarray           # int32 (n,): index of the file each document starts in
    tokens: np.ndarray          # the documents' tokens, back to back
    lengths: np.ndarray         # int64 (n,)


def doc_batches(ds, max_tokens: int = 1 << 24, max_docs: int = 1 << 16
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, lengths) of whole documents of `ds` in order, about `max_tokens` at a time (one
    longer document alone). Uses `ds.doc_offsets` (8 bytes a document)."""
    off = ds.doc_offsets
    n, i = len(ds), 0
    while i < n:
        j = int(np.searchsorted(off, off[i] + max_tokens, side="right")) - 1
        j = min(max(j, i + 1), n, i + max_docs)
        yield ds.window(int(off[i]), int(off[j] - off[i])), np.diff(off[i:j + 1])
        i = j


def split_stream(pieces: Iterator[tuple[int, np.ndarray]], sep: int, where: str
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Cut one token stream, given as (file index, chunk) pieces in order, into whole documents
    at every `sep`: just after it (``where="after"``, nanoGPT) or just before it (``"before"``,
    llm.c). Yields (start file per document, tokens, lengths); a document may span pieces.

        >>> [(t.tolist(), n.tolist()) for _, t, n in split_stream(iter([(0, np.array([5, 0, 6])),
        ...     (1, np.array([7, 0]))]), 0, "after")]
        [([5, 0], [2]), ([6, 7, 0], [3])]
    """
    carry, carry_file = None, 0
    shift = 1 if where == "after" else 0
    for f, chunk in pieces:
        lead = 0 if carry is None else len(carry)
        buf = chunk if carry is None else np.concatenate([carry, chunk])
        cuts = np.flatnonzero(chunk == sep) + shift + lead
        cuts = cuts[(cuts > 0) & (cuts <= len(buf))]
        if len(cuts) == 0:
            carry, carry_file = buf, (carry_file if carry is not None else f)
            continue
        starts = np.concatenate([[0], cuts[:-1]])
        files = np.where(starts < lead, carry_file, f).astype(np.int32)
        yield files, buf[:cuts[-1]], np.diff(np.concatenate([[0], cuts])).astype(np.int64)
        carry = buf[cuts[-1]:] if cuts[-1] < len(buf) else None
        carry_file = f
    if carry is not None and len(carry):
        yield np.array([carry_file], np.int32), carry, np.array([len(carry)], np.int64)


def out_folder(out: Path, fmt: str) -> Path:
    """Create the export folder `out`; a QovaryxDataError (not a traceback) where a file is."""
    if out.exists() and not out.is_dir():
        from qovaryx_data.errors import QovaryxDataError

        raise QovaryxDataError(f"{out}: a file, and an export to {fmt} writes a folder of files "
                               f"there; give a folder (--out)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def atomic_out(path: Path):
    """A temp path beside `path` (renamed over it by the caller when complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")
