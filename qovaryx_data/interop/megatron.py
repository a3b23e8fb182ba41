"""Megatron-LM's ``IndexedDataset``: ``PREFIX.bin`` (tokens back to back) + ``PREFIX.idx``.

The index, little-endian (megatron/core/datasets/indexed_dataset.py, ``_IndexWriter``)::

    offset  size        field
    0       9           b"MMIDIDX\\x00\\x00"
    9       8   u64     version (1)
    17      1   u8      dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                        7 float32, 8 uint16
    18      8   u64     S, the number of sequences
    26      8   u64     D, the number of document indices (documents + 1)
    34      4·S i32     sequence lengths (tokens)
    ..      8·S i64     sequence pointers (byte offsets into .bin)
    ..      8·D i64     document indices: document k is sequences [idx[k], idx[k+1])
    (..     S   i8      sequence modes, multimodal datasets only: not read here)

Export writes one sequence per document (as ``tools/preprocess_data.py`` without sentence
splitting), uint16 tokens (code 8), or int32 (code 4) for uint32 datasets (Megatron has no uint32
code; ids stay below 2**31). Import joins a document's sequences. The layout is read and written
here by hand: megatron-core would pull in torch and its whole ``megatron.core`` package for five
fields; tests hold both sides to megatron-core's own ``IndexedDataset``.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qovaryx_data.errors import FormatError, QovaryxDataError
from qovaryx_data.interop import ExportOptions
from qovaryx_data.interop.stream import Batch, atomic_out, doc_batches

SEPARATED = False                 # documents are bounded by the index
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, document indices
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
          7: np.float32, 8: np.uint16}
_INT_CODES = (1, 2, 3, 4, 5, 8)
_DOCS_PER_BATCH = 1 << 14


def prefix_of(path: Path) -> Path:
    """PREFIX of PREFIX, PREFIX.bin or PREFIX.idx."""
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def find_inputs(path: Path) -> dict[str, list[Path]]:
    prefix = prefix_of(path)
    for ext in (".idx", ".bin"):
        if not prefix.with_name(prefix.name + ext).is_file():
            raise QovaryxDataError(f"{prefix}{ext}: missing; a Megatron dataset is PREFIX.bin + "
                                   f"PREFIX.idx (give PREFIX)")
    return {"": [prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")]}


def read_index(idx: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """(token dtype, sequence lengths, sequence pointers, document indices), memory-mapped."""
    with open(idx, "rb") as f:
        raw = f.read(_HEAD.size)
    if len(raw) < _HEAD.size or raw[:9] != MAGIC:
        raise FormatError(f"{idx}: starts with {raw[:9]!r}, expected Megatron's index magic "
                          f"{MAGIC!r}: not a Megatron .idx file")
    _, version, code, n_seq, n_doc = _HEAD.unpack(raw)
    if version != VERSION:
        raise FormatError(f"{idx}: Megatron index version {version}, this reader knows {VERSION}")
    if code not in _INT_CODES:
        what = DTYPES[code].__name__ if code in DTYPES else "unknown"
        raise FormatError(f"{idx}: dtype code {code} ({what}); token ids need an integer code "
                          f"({', '.join(f'{c} {DTYPES[c].__name__}' for c in _INT_CODES)})")
    want = _HEAD.size + 12 * n_seq + 8 * n_doc
    size = idx.stat().st_size
    if size == want + n_seq and n_seq:
        raise FormatError(f"{idx}: a multimodal Megatron index (sequence modes after the "
                          f"document indices); only token datasets are imported")
    if size != want:
        raise FormatError(f"{idx}: {size} bytes, but its header ({n_seq} sequences, {n_doc} "
                          f"document indices) implies {want}: the file is truncated or damaged")
    mm = np.memmap(idx, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, "<i4", n_seq, _HEAD.size)
    pointers = np.frombuffer(mm, "<i8", n_seq, _HEAD.size + 4 * n_seq)
    docs = np.frombuffer(mm, "<i8", n_doc, _HEAD.size + 12 * n_seq)
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq:
        raise FormatError(f"{idx}: document indices must run from 0 to the {n_seq} sequences, "
                          f"found {docs[:1].tolist()} .. {docs[-1:].tolist()}")
    return np.dtype(DTYPES[code]).newbyteorder("<"), lengths, pointers, docs


def read(files: list[Path], eos_id: int | None) -> Iterator[Batch]:
    bin_path, idx_path = files
    dtype, lengths, pointers, docs = read_index(idx_path)
    need = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if len(lengths) else 0
    size = bin_path.stat().st_size
    if size < need:
        raise FormatError(f"{bin_path}: {size} bytes, but {idx_path} points "
                          f"up to byte {need}: the .bin is truncated")
    n_items = size // dtype.itemsize
    data = np.memmap(bin_path, mode="r", dtype=dtype, shape=(n_items,)) if n_items else \
        np.zeros(0, dtype)
    item = dtype.itemsize
    for d0 in range(0, len(docs) - 1, _DOCS_PER_BATCH):
        d = docs[d0:d0 + _DOCS_PER_BATCH + 1]
        if (np.diff(d) < 0).any():
            raise FormatError(f"{idx_path}: document indices decrease near document {d0}")
        s0, s1 = int(d[0]), int(d[-1])
        seq_len = lengths[s0:s1].astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(seq_len)])
        doc_len = cum[d[1:] - s0] - cum[d[:-1] - s0]
        ptr = pointers[s0:s1]
        bad = (seq_len < 0) | (ptr < 0) | (ptr % item != 0) | (ptr + seq_len * item > size)
        if bad.any():   # a damaged index would otherwise yield short documents silently
            k = int(np.flatnonzero(bad)[0])
            raise FormatError(f"{idx_path}: sequence {s0 + k} has length {int(seq_len[k])} at "
                              f"byte {int(ptr[k])}, outside {bin_path} ({size} bytes of "
                              f"{dtype.name} tokens): the index is damaged or not this .bin's")
        if s1 > s0 and (ptr == ptr[0] + cum[:-1] * item).all():   # contiguous: one slice
            a = int(ptr[0]) // item
            tokens = data[a:a + int(cum[-1])]
        else:   # sequences written out of order (a hand-built index): gather them
            tokens = np.concatenate([data[int(p) // item:int(p) // item + int(n)]
                                     for p, n in zip(ptr, seq_len)] or [np.zeros(0, dtype)])
        yield Batch(np.zeros(len(doc_len), np.int32), np.asarray(tokens), doc_len)


def write(ds, out: Path, split: str | None, opts: ExportOptions, eos_id: int | None,
          several: bool = False) -> tuple[list[Path], int]:
    """PREFIX.bin + PREFIX.idx of `ds` (PREFIX = `out`; PREFIX_train / PREFIX_val for the splits
    of a pack with validation)."""
    prefix = prefix_of(out)
    if several and split:
        prefix = prefix.with_name(f"{prefix.name}_{split}")
    dtype, code = _dtype_of(ds)
    bin_path = prefix.with_name(prefix.name + ".bin")
    idx_path = prefix.with_name(prefix.name + ".idx")
    n = len(ds)
    tmp_bin, tmp_idx = atomic_out(bin_path), atomic_out(idx_path)
    try:
        with open(tmp_bin, "wb") as f:
            for tokens, _ in doc_batches(ds):
                f.write(np.ascontiguousarray(tokens).view(dtype).tobytes())
        with open(tmp_idx, "wb") as f:
            f.write(_HEAD.pack(MAGIC, VERSION, code, n, n + 1))
            for _, lengths in doc_batches(ds):   # lengths, then pointers: two passes
                if len(lengths) and lengths.max() >= 2**31:
                    raise QovaryxDataError(f"{ds.path}: a document of {int(lengths.max())} tokens; "
                                           f"Megatron stores lengths as int32")
                f.write(lengths.astype("<i4").tobytes())
            f.write((ds.doc_offsets[:-1] * dtype.itemsize).astype("<i8").tobytes())
            f.write(np.arange(n + 1, dtype="<i8").tobytes())
        # an earlier export's .idx goes first: a run stopped between the renames leaves a .bin
        # without an index, never a new .bin read through an old index
        idx_path.unlink(missing_ok=True)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    return [bin_path, idx_path], ds.num_tokens


def _dtype_of(ds) -> tuple[np.dtype, int]:
    if ds.dtype.itemsize == 2:
        return np.dtype("<u2"), 8
    max_id = int(ds.info["tokenizer"].get("max_id", ds.info["tokenizer"]["vocab_size"] - 1))
    if max_id >= 2**31:
        raise QovaryxDataError(f"{ds.path}: the tokenizer's largest id {max_id} does not fit "
                               f"Megatron's int32 tokens (it has no uint32 dtype code)")
    return np.dtype("<i4"), 4
