"""llm.c's token shards (``dev/data/data_common.py`` ``write_datafile``): a header of 256
little-endian int32 (``header[0]`` magic, ``header[1]`` version, ``header[2]`` the token count,
the rest zero), then the tokens: magic 20240520 version 1 for uint16 ("gpt-2"), 20240801 version 7
for uint32 ("llama-3"). ``header[2]`` is an int32, so a shard holds at most 2**31 - 1 tokens.

Documents are marked by the end-of-text id *prepended* to each (``dev/data/fineweb.py``:
``all_tokens.append(eot); all_tokens.extend(tokens)``), and shards cut the stream every
``shard_tokens`` tokens, a document running on into the next shard. Export writes
``{name}_{split}_{NNNNNN}.bin`` the same way (all of them renamed into place at the end,
replacing every shard of an earlier export with that name and split); a ``separator: eos`` document ``t + [eos]`` becomes
``[eos] + t`` (the same tokens, the separator moved to the front), a ``separator: none`` document
``t`` becomes ``[eos] + t``. Import reads the shards in name order as one stream, cuts it before
each end-of-text id and moves the separator back to the end (``separator: none``: drops it);
tokens before the stream's first end-of-text form a document of their own, as they are.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qovaryx_data.errors import FormatError, QovaryxDataError
from qovaryx_data.interop import ExportOptions
from qovaryx_data.interop.stream import (Batch, atomic_out, doc_batches, out_folder,
                                         split_stream)

SEPARATED = True
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# magic -> (version, token dtype)
KINDS = {20240520: (1, np.dtype("<u2")), 20240801: (7, np.dtype("<u4"))}
_MAGIC_OF = {v[1]: (m, v[0]) for m, v in KINDS.items()}
_CHUNK = 1 << 24
_SPLIT = re.compile(r"_(train|val)_\d+\.bin$")


def find_inputs(path: Path) -> dict[str, list[Path]]:
    """A shard, a glob of shards, or a folder of them (*.bin, name order); a folder with both
    *_train_* and *_val_* shards is two splits."""
    if path.is_file():
        return {"": [path]}
    files = sorted(path.glob("*.bin")) if path.is_dir() else sorted(path.parent.glob(path.name))
    if not files:
        raise QovaryxDataError(f"{path}: no llm.c shards (*.bin) found")
    by_split: dict[str, list[Path]] = {}
    for f in files:
        m = _SPLIT.search(f.name)
        by_split.setdefault(m.group(1) if m else "", []).append(f)
    if path.is_dir() and set(by_split) == {"train", "val"}:
        return by_split
    return {"": files}


def read_header(path: Path) -> tuple[np.dtype, int]:
    """(token dtype, token count) of a shard; FormatError naming what the header says."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise FormatError(f"{path}: {len(raw)} bytes, shorter than llm.c's {HEADER_BYTES}-byte header")
    magic, version, count = (int(x) for x in np.frombuffer(raw, "<i4", 3))
    if magic not in KINDS:
        raise FormatError(f"{path}: magic {magic}, expected llm.c's {' or '.join(map(str, KINDS))}: "
                          f"not an llm.c token shard")
    want_version, dtype = KINDS[magic]
    if version != want_version:
        raise FormatError(f"{path}: magic {magic} with version {version}, expected {want_version}")
    size = path.stat().st_size
    if count < 0 or size != HEADER_BYTES + count * dtype.itemsize:
        raise FormatError(f"{path}: {size} bytes, but its header says {count} {dtype.name} tokens "
                          f"({HEADER_BYTES + count * dtype.itemsize} bytes): truncated or damaged")
    return dtype, count


def read(files: list[Path], eos_id: int | None) -> Iterator[Batch]:
    def pieces():
        for i, f in enumerate(files):
            dtype, count = read_header(f)
            if count:
                mm = np.memmap(f, mode="r", dtype=dtype, offset=HEADER_BYTES, shape=(count,))
                for a in range(0, count, _CHUNK):
                    yield i, np.asarray(mm[a:a + _CHUNK])

    for files_of, tokens, lengths in split_stream(pieces(), eos_id, "before"):
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        lead = (lengths > 0) & (tokens[np.minimum(starts, len(tokens) - 1)] == eos_id)
        # [eos] + t -> t + [eos]: drop each leading separator, insert it at the document's end
        body = np.delete(tokens, starts[lead])
        ends = np.cumsum(lengths - lead)
        yield Batch(files_of, np.insert(body, ends[lead], eos_id).astype(tokens.dtype), lengths)


def write(ds, out: Path, split: str | None, opts: ExportOptions, eos_id: int | None,
          several: bool = False) -> tuple[list[Path], int]:
    if eos_id is None:
        raise QovaryxDataError(f"{ds.path}: llm.c marks documents with a prepended end-of-text "
                               f"id, and the tokenizer has no <|endoftext|>")
    dtype = np.dtype("<u2") if ds.dtype.itemsize == 2 else np.dtype("<u4")
    magic, version = _MAGIC_OF[dtype]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", opts.name or ds.info.get("name") or "qovaryx")
    eos_policy = ds.info["separator"]["policy"] == "eos"
    out_folder(out, "llmc")
    shard = _ShardWriter(out, f"{name}_{split or 'train'}", dtype, magic, version,
                         opts.shard_tokens)
    try:
        for tokens, lengths in doc_batches(ds):
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            ends = np.cumsum(lengths) - 1
            strip = np.zeros(len(lengths), bool)
            if eos_policy and len(tokens):
                strip = (lengths > 0) & (tokens[np.maximum(ends, 0)] == eos_id)
            body = np.delete(tokens, ends[strip])
            new_starts = starts - np.concatenate([[0], np.cumsum(strip)[:-1]])
            shard.write(np.insert(body, new_starts, eos_id).astype(dtype))
        shard.close()
    except BaseException:
        shard.abort()
        raise
    return shard.files, shard.written


class _ShardWriter:
    """Cuts one stream into shards of `limit` tokens (the last one shorter). Each is written under
    a temp name; `close` then removes the shards of an earlier export with the same stem and
    renames the new ones into place. llm.c has no manifest (its loader globs the shards), so a run
    killed half-way must not leave some finished shards (they would read as a whole, shorter
    dataset) nor an earlier export's extra shards beside the new ones (read as more data)."""

    def __init__(self, out: Path, stem: str, dtype, magic: int, version: int, limit: int):
        self.out, self.stem, self.dtype, self.limit = out, stem, dtype, limit
        self.magic, self.version = magic, version
        self.files: list[Path] = []
        self.tmps: list[Path] = []
        self.written = 0
        self.f = None
        self.n = 0

    def _open(self) -> None:
        self.path = self.out / f"{self.stem}_{len(self.files):06d}.bin"
        self.tmp = atomic_out(self.path)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.n = 0

    def write(self, tokens: np.ndarray) -> None:
        while len(tokens):
            if self.f is None:
                self._open()
            take = tokens[:self.limit - self.n]
            self.f.write(take.tobytes())
            self.n += len(take)
            self.written += len(take)
            tokens = tokens[len(take):]
            if self.n == self.limit:
                self._finish()

    def _finish(self) -> None:
        header = np.zeros(HEADER_INTS, "<i4")
        header[:3] = self.magic, self.version, self.n
        self.f.seek(0)
        self.f.write(header.tobytes())
        self.f.close()
        self.f = None
        self.files.append(self.path)
        self.tmps.append(self.tmp)

    def close(self) -> None:
        if self.f is None and not self.files:
            self._open()           # an empty dataset: one shard of 0 tokens
        if self.f is not None:
            self._finish()
        mine = re.compile(re.escape(self.stem) + r"_\d{6}\.bin")
        for p in self.out.iterdir():           # an earlier export of this stem, all of it
            if mine.fullmatch(p.name) and p.is_file():
                p.unlink()
        for tmp, path in zip(self.tmps, self.files):
            os.replace(tmp, path)

    def abort(self) -> None:
        if self.f is not None:
            self.f.close()
        for tmp in self.tmps + ([self.tmp] if self.f is not None else []):
            tmp.unlink(missing_ok=True)
        self.f = None
