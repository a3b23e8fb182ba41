"""`PackedDataset`: zero-copy random access to a packed dataset, and `verify` / `inspect_dataset`.

Opening reads dataset.json, checks every listed file's size and each binary header (magic,
version, dtype, count) and memory-maps the shards: O(number of shards), whatever the number of
documents. ``ds[i].tokens`` and ``ds.window(start, n)`` inside one shard are numpy views of the
memmap; per-row metadata (source, row, decision, image index) is read from the memory-mapped
Arrow file of a shard on its first use.

    >>> ds = PackedDataset("build/packed/shakespeare")          # doctest: +SKIP
    >>> len(ds), ds.num_tokens, ds[0].tokens[:4]
    (42, 1456789, memmap([1234,  56, 789,  10], dtype=uint16))
    >>> ds.window(1000, 2049).shape
    (2049,)
"""
from __future__ import annotations

import json
import operator
import os
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qovaryx_data.errors import FormatError, TokenizerError
from qovaryx_data.format import (HEADER_SIZE, META_COLUMNS, META_FORMAT_KEY, META_FORMAT_VALUE,
                                 META_VERSION_KEY, PACK_FORMAT_MAJOR, SOURCE_FILES_FORMAT,
                                 SOURCE_FILES_VERSION, file_entry, read_header)
from qovaryx_data.manifest import DATASET_JSON, read_dataset_json
from qovaryx_data.sources import NUM_DECISION_CLASSES


@dataclass(slots=True)
class Document:
    """One row of a packed dataset."""
    tokens: np.ndarray                 # view into the shard memmap (uint16/uint32), no copy
    image: np.ndarray | None           # uint8 (H, W, C) view into the .img memmap, or None
    decision: int | None               # class 0..3, or None
    decision_position: int | None      # index into tokens where the decision head pools
    source: str                        # source file the row came from
    row: int                           # row / line number within that file


def _memmap(path: Path, dtype, count: int, shape_tail: tuple = ()) -> np.ndarray:
    """A read-only ndarray over the payload of `path` (a plain ndarray view of an np.memmap:
    slicing it is cheaper than slicing the memmap subclass, and it shares the mapping)."""
    if count == 0:
        return np.empty((0, *shape_tail), dtype=dtype)
    mm = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count, *shape_tail))
    return mm.view(np.ndarray)


class PackedDataset:
    """A packed dataset folder (the one holding dataset.json), opened read-only.

    `tokenizer` (a tokenizers.Tokenizer, a transformers fast tokenizer or a tokenizer folder):
    when given, a dataset packed with a different tokenizer (by content hash) is refused.
    """

    def __init__(self, path: str | os.PathLike, tokenizer: Any = None):
        self.path = Path(path)
        self.info = read_dataset_json(self.path)
        if tokenizer is not None:
            self._check_tokenizer(tokenizer)
        self._open()

    # ---- opening ----
    def _open(self) -> None:
        info, folder = self.info, self.path
        for name, f in info["files"].items():
            p = folder / name
            if not p.is_file():
                raise FormatError(f"{p}: missing; dataset.json lists it ({f['bytes']} bytes): the "
                                  f"dataset is damaged, re-run pack")
            size = p.stat().st_size
            if size != f["bytes"]:
                raise FormatError(f"{p}: {size} bytes on disk, dataset.json expects {f['bytes']}: "
                                  f"the file is truncated or was modified (re-run pack)")
        self.dtype = np.dtype(info["dtype"]).newbyteorder("<")
        self._tokens, self._offsets, self._images = [], [], []
        self.image_shape = tuple(info["images"]["shape"]) if info.get("images") else None
        for sh in info["shards"]:
            h = read_header(folder / sh["tokens"], "tokens")
            if h.dtype != self.dtype or h.count != sh["num_tokens"]:
                raise FormatError(f"{folder / sh['tokens']}: header says {h.count} tokens of "
                                  f"{h.dtype.name}, dataset.json expects {sh['num_tokens']} of "
                                  f"{self.dtype.name}")
            self._tokens.append(_memmap(folder / sh["tokens"], self.dtype, h.count))
            h = read_header(folder / sh["offsets"], "offsets")
            if h.count != sh["num_documents"] + 1:
                raise FormatError(f"{folder / sh['offsets']}: header says {h.count} offsets, "
                                  f"dataset.json expects {sh['num_documents'] + 1}")
            self._offsets.append(_memmap(folder / sh["offsets"], np.dtype("<i8"), h.count))
            if sh.get("images"):
                h = read_header(folder / sh["images"], "images")
                if h.count != sh["num_images"] or tuple(h.item_shape) != self.image_shape:
                    raise FormatError(f"{folder / sh['images']}: header says {h.count} images of "
                                      f"{h.item_shape}, dataset.json expects {sh['num_images']} "
                                      f"of {self.image_shape}")
                self._images.append(_memmap(folder / sh["images"], np.uint8, h.count,
                                            (h.item_bytes,)))
            else:
                self._images.append(None)
        self._doc_starts = np.cumsum([0] + [s["num_documents"] for s in info["shards"]])
        self._tok_starts = np.cumsum([0] + [s["num_tokens"] for s in info["shards"]])
        self._tok_starts_list = [int(x) for x in self._tok_starts]   # for bisect (hot path)
        self._doc_starts_list = [int(x) for x in self._doc_starts]
        self._n_shards = len(self._tokens)
        self._meta: list[dict | None] = [None] * len(info["shards"])
        self._doc_offsets = None
        self._text_idx = self._mm_idx = None
        self._text_spans = None
        self.num_tokens = int(self._tok_starts[-1])
        self.tokenizer_dir = self.path / info["tokenizer"]["path"]
        dec = info.get("decision") or {}
        self.decision_names = dec.get("labels")
        self.num_decision_classes = dec.get("num_classes", NUM_DECISION_CLASSES)
        self._source_files: list[str] | None = None   # read on first use (source_files)

    @property
    def source_files(self) -> list[str]:
        """The files rows came from (`Document.source`), indexed by the metadata column `file`.

        Format 1.1 keeps them in ``source_files.json``, read here on first use (so opening stays
        O(shards) however many files were packed); 1.0 datasets list them in dataset.json."""
        if self._source_files is None:
            self._source_files = _read_source_files(self.path, self.info)
        return self._source_files

    def _check_tokenizer(self, tokenizer: Any) -> None:
        from qovaryx_data.tokenizer import tokenizer_hash

        got = tokenizer_hash(tokenizer)
        want = self.info["tokenizer"]["hash"]
        if got != want:
            raise TokenizerError(f"{self.path}: packed with tokenizer {want[:16]}…, but the given "
                                 f"tokenizer is {got[:16]}…; use the tokenizer stored in "
                                 f"{self.path / 'tokenizer'} or re-pack with yours")

    # ---- pickling: by path (DataLoader workers reopen the memmaps) ----
    def __getstate__(self):
        return {"path": str(self.path)}

    def __setstate__(self, state):
        self.__init__(state["path"])

    # ---- rows ----
    def __len__(self) -> int:
        return self._doc_starts_list[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} out of range for a dataset of {n} documents")
        s = bisect_right(self._doc_starts_list, i) - 1
        return s, i - self._doc_starts_list[s]

    def _shard_meta(self, s: int) -> dict:
        m = self._meta[s]
        if m is None:
            m = self._meta[s] = _read_meta(self.path / self.info["shards"][s]["meta"])
        return m

    def __getitem__(self, i: int) -> Document:
        s, j = self._locate(i)
        off = self._offsets[s]
        tokens = self._tokens[s][off[j]:off[j + 1]]
        m = self._shard_meta(s)
        img_i = int(m["image"][j])
        image = None
        if img_i >= 0:
            h, w, c = self.image_shape
            image = self._images[s][img_i, :h * w * c].reshape(h, w, c)
        dec = int(m["decision"][j])
        pos = int(m["decision_position"][j])
        return Document(tokens, image, dec if dec >= 0 else None, pos if pos >= 0 else None,
                        self.source_files[int(m["file"][j])], int(m["row"][j]))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"PackedDataset({str(self.path)!r}, documents={len(self)}, "
                f"tokens={self.num_tokens}, shards={len(self._tokens)}, dtype={self.dtype.name})")

    # ---- the token stream ----
    def window(self, start: int, n: int) -> np.ndarray:
        """tokens[start:start+n] of the concatenated stream of all documents (shorter at the end).

        A view of the memmap inside one shard; a copy when the window crosses a shard boundary.
        """
        starts = self._tok_starts_list
        s = bisect_right(starts, start) - 1
        if 0 <= s < self._n_shards and 0 <= n and start + n <= starts[s + 1]:
            lo = start - starts[s]                          # the common case: inside one shard
            return self._tokens[s][lo:lo + n]
        if start < 0 or n < 0:
            raise ValueError(f"window(start={start}, n={n}): both must be >= 0")
        if s >= self._n_shards:
            return self._tokens[-1][:0]
        pieces, need, lo = [], n, start - starts[s]
        while need > 0 and s < self._n_shards:
            piece = self._tokens[s][lo:lo + need]
            pieces.append(piece)
            need -= len(piece)
            s, lo = s + 1, 0
        return np.concatenate(pieces)

    def document_starts(self, start: int, n: int) -> np.ndarray:
        """Positions in [0, n), relative to `start`, where a document begins inside
        window(start, n): O(log documents) binary searches in the offset memmaps, no O(documents)
        array (unlike doc_offsets). A position 0 means a document begins at `start` itself.

            >>> ds.document_starts(1, 6)      # documents at 0, 3, 5, 5, 9  # doctest: +SKIP
            array([2, 4])
        """
        starts = self._tok_starts_list
        s = max(bisect_right(starts, start) - 1, 0)
        out, end = [], start + n
        while s < self._n_shards and starts[s] < end:
            off = self._offsets[s][:-1]                   # document starts within the shard
            lo, hi = max(start - starts[s], 0), end - starts[s]
            a, b = np.searchsorted(off, lo, "left"), np.searchsorted(off, hi, "left")
            out.append(np.unique(off[a:b]) + (starts[s] - start))
            s += 1
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 (n_docs + 1) offsets of every document in the concatenated stream (built once,
        on first use: O(documents))."""
        if self._doc_offsets is None:
            parts = [off[:-1] + int(base) for off, base in zip(self._offsets, self._tok_starts)]
            parts.append(np.array([self.num_tokens], np.int64))
            self._doc_offsets = np.concatenate(parts).astype(np.int64, copy=False)
        return self._doc_offsets

    def _row_kinds(self) -> np.ndarray:
        """bool per row: True for a row with an image or a decision label. Built afresh on each
        call (O(documents)) and not kept: a long-lived reader in every DataLoader worker would
        otherwise hold one byte per document."""
        kinds = [(m["decision"] >= 0) | (m["image"] >= 0)
                 for m in (self._shard_meta(s) for s in range(self._n_shards))]
        return np.concatenate(kinds) if kinds else np.zeros(0, bool)

    @property
    def text_doc_indices(self) -> np.ndarray:
        """Indices of text-only rows (packed into windows across documents); built on first use."""
        if self._text_idx is None:
            self._text_idx = np.flatnonzero(~self._row_kinds()).astype(np.int64)
        return self._text_idx

    @property
    def multimodal_doc_indices(self) -> np.ndarray:
        """Indices of rows with an image or a decision label (served whole, one per example)."""
        if self._mm_idx is None:
            self._mm_idx = np.flatnonzero(self._row_kinds()).astype(np.int64)
        return self._mm_idx

    @property
    def text_spans(self) -> np.ndarray:
        """int64 (n, 2): the ``[start, end)`` token ranges of the stream covered by maximal runs of
        consecutive text-only rows, in stream order; empty runs (rows without tokens) are left out.

        A text window (``collate.text_window``) must lie inside one span: rows with an image or a
        decision label are served whole and never cut by, or folded into, a window (DESIGN §3).
        Such a row always ends a run, even one without tokens. A span may cross shard boundaries
        (a window there is a copy). Built on first use from the rows' metadata (vectorised; no
        array over all documents is kept, only the spans).

            >>> # rows: text [0, 5), text [5, 9), image [9, 12), text [12, 20)  # doctest: +SKIP
            >>> ds.text_spans.tolist()
            [[0, 9], [12, 20]]
        """
        if self._text_spans is None:
            text = ~self._row_kinds()
            edges = np.diff(np.concatenate([[False], text, [False]]).astype(np.int8))
            first = np.flatnonzero(edges == 1)          # first row of each text-only run
            stop = np.flatnonzero(edges == -1)          # one past its last row
            spans = np.stack([self._doc_offsets_at(first), self._doc_offsets_at(stop)], axis=1)
            self._text_spans = np.ascontiguousarray(spans[spans[:, 1] > spans[:, 0]],
                                                    dtype=np.int64).reshape(-1, 2)
        return self._text_spans

    def _doc_offsets_at(self, rows: np.ndarray) -> np.ndarray:
        """Stream offsets (int64) where rows `rows` (sorted, 0..len(self)) begin: len(self) maps
        to num_tokens. One vectorised lookup per shard in its offset memmap."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full(len(rows), self.num_tokens, dtype=np.int64)
        shard = np.searchsorted(self._doc_starts, rows, side="right") - 1
        for s in np.unique(shard[rows < len(self)]):
            sel = shard == s
            out[sel] = self._offsets[s][rows[sel] - self._doc_starts[s]] + self._tok_starts[s]
        return out

    def load_tokenizer(self):
        """The tokenizers.Tokenizer stored with the data."""
        from qovaryx_data.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_dir)

    def to_hf(self, iterable: bool = False):
        """A datasets.Dataset (or IterableDataset) view; see qovaryx_data.hf.to_hf."""
        from qovaryx_data.hf import to_hf

        return to_hf(self, iterable=iterable)


def _read_source_files(folder: Path, info: dict) -> list[str]:
    entry = info.get("source_files")
    if isinstance(entry, list):   # format 1.0: inline
        return entry
    # 1.1 names the side file under its own key, so that a 1.0 reader (which indexes the list under
    # `source_files`) fails on the missing key instead of indexing the file name's characters; the
    # first 1.1 writes put the name under `source_files` itself, read here too.
    entry = info.get("source_files_file", entry)
    if not isinstance(entry, str):
        raise FormatError(f"{folder / 'dataset.json'}: neither 'source_files' (format 1.0) nor "
                          f"'source_files_file' (1.1) names the source files; the dataset is damaged, re-run pack")
    p = folder / entry
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{p}: unreadable ({e}); dataset.json lists it as the source files: "
                          f"the dataset is damaged, re-run pack") from None
    got = (rec.get("format"), rec.get("version")) if isinstance(rec, dict) else (None, None)
    if got != (SOURCE_FILES_FORMAT, SOURCE_FILES_VERSION):
        raise FormatError(f"{p}: format {got[0]!r} version {got[1]!r}, expected "
                          f"{SOURCE_FILES_FORMAT!r} version {SOURCE_FILES_VERSION}; re-run pack "
                          f"or use a matching qovaryx release")
    return rec["files"]


def _read_meta(path: Path) -> dict[str, np.ndarray]:
    """Columns of a shard's metadata Arrow file as numpy arrays, nulls read as -1.

    Files written by qovaryx hold one record batch whose null slots carry -1 in the values
    buffer: each column is then a zero-copy view of the memory map. Other files are converted."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{path}: not a readable Arrow IPC file ({e}); re-run pack") from None
    md = reader.schema.metadata or {}
    if md.get(META_FORMAT_KEY) != META_FORMAT_VALUE:
        raise FormatError(f"{path}: schema metadata {META_FORMAT_KEY.decode()}="
                          f"{md.get(META_FORMAT_KEY)!r}, expected {META_FORMAT_VALUE!r}")
    version = md.get(META_VERSION_KEY, b"").decode()
    if version.split(".")[0] != str(PACK_FORMAT_MAJOR):
        raise FormatError(f"{path}: metadata version {version!r}, expected major {PACK_FORMAT_MAJOR}")
    out = {}
    if reader.num_record_batches == 1:
        batch = reader.get_batch(0)
        for name, dt, _ in META_COLUMNS:
            col = batch.column(name)
            if col.type != pa.from_numpy_dtype(dt):
                raise FormatError(f"{path}: column {name!r} is {col.type}, expected "
                                  f"{pa.from_numpy_dtype(dt)}")
            out[name] = np.frombuffer(col.buffers()[1], dtype=dt, count=len(col),
                                      offset=col.offset * np.dtype(dt).itemsize)
        return out
    table = reader.read_all()
    for name, dt, _ in META_COLUMNS:
        out[name] = table.column(name).fill_null(-1).to_numpy().astype(dt, copy=False)
    return out


# ============================================================================ verify

@dataclass
class VerifyResult:
    path: Path
    checked: int                       # files re-hashed
    bad: list[tuple[str, str]]         # (file, what is wrong)

    @property
    def ok(self) -> bool:
        return not self.bad


def dataset_folders(path: str | os.PathLike) -> list[Path]:
    """The dataset folder itself, or its train/ and val/ when it is a pack with a validation split."""
    path = Path(path)
    if (path / DATASET_JSON).is_file():
        return [path]
    subs = [path / s for s in ("train", "val") if (path / s / DATASET_JSON).is_file()]
    return subs or [path]


def verify(path: str | os.PathLike) -> VerifyResult:
    """Re-hash every file listed in dataset.json (both splits of a pack with validation).

    Returns a VerifyResult; `.bad` names each missing, resized or changed file.
    FormatError when dataset.json itself is missing or unreadable.
    """
    bad, checked = [], 0
    for folder in dataset_folders(path):
        info = read_dataset_json(folder)
        for name, want in info["files"].items():
            p = folder / name
            checked += 1
            if not p.is_file():
                bad.append((str(p), "missing"))
                continue
            got = file_entry(p)
            if got["bytes"] != want["bytes"]:
                bad.append((str(p), f"size {got['bytes']} bytes, expected {want['bytes']}"))
            elif got["xxh3_128"] != want["xxh3_128"]:
                bad.append((str(p), f"xxh3-128 {got['xxh3_128']}, expected {want['xxh3_128']}"))
    return VerifyResult(Path(path), checked, bad)


# ============================================================================ inspect

def inspect_dataset(path: str | os.PathLike, *, samples: int = 1, sample_tokens: int = 60
                    ) -> dict:
    """A summary of a packed dataset (or of train/ and val/): counts, per-source counts, skips,
    a document-length histogram (powers of two) and decoded samples."""
    reports = {}
    for folder in dataset_folders(path):
        ds = PackedDataset(folder)
        info = ds.info
        lengths = np.diff(ds.doc_offsets)
        edges = [0, 1] + [2 ** k for k in range(1, 40) if 2 ** (k - 1) <= max(lengths.max(initial=0), 1)]
        hist, _ = np.histogram(lengths, bins=edges + [edges[-1] * 2]) if len(lengths) else ([], [])
        histogram = [{"min": int(a), "max": int(b) - 1, "documents": int(c)}
                     for a, b, c in zip(edges, edges[1:] + [edges[-1] * 2], hist) if c]
        sample = []
        if len(ds):
            tok = ds.load_tokenizer()
            for i in np.linspace(0, len(ds) - 1, num=min(samples, len(ds))).astype(int):
                d = ds[int(i)]
                sample.append({"index": int(i), "source": d.source, "row": d.row,
                               "tokens": int(len(d.tokens)),
                               "text": tok.decode(d.tokens[:sample_tokens].tolist(),
                                                  skip_special_tokens=False)})
        reports[info.get("split") or "dataset"] = {
            "path": str(folder),
            "name": info["name"],
            "format_version": info["format_version"],
            "documents": len(ds),
            "tokens": ds.num_tokens,
            "dtype": info["dtype"],
            "shards": len(info["shards"]),
            "tokenizer": {"hash": info["tokenizer"]["hash"],
                          "vocab_size": info["tokenizer"]["vocab_size"]},
            "sources": info["sources"],
            "rows_with_images": int(info.get("num_images", 0)),
            "rows_with_image_or_label": int(info["num_multimodal_documents"]),
            "decision_counts": _decision_counts(info),
            "skipped": info["skipped"],
            "skipped_sample": info["skipped_sample"][:10],
            "length_histogram": histogram,
            "length_mean": float(lengths.mean()) if len(lengths) else 0.0,
            "samples": sample,
        }
    return reports


def _decision_counts(info: dict) -> dict | None:
    if not info.get("decision"):
        return None
    k = int(info["decision"].get("num_classes", NUM_DECISION_CLASSES))
    counts = [sum(s["decisions"][c] for s in info["sources"]) for c in range(k)]
    names = list(info["decision"].get("labels") or [])
    names += [str(c) for c in range(len(names), k)]
    return {names[c]: counts[c] for c in range(k)}
