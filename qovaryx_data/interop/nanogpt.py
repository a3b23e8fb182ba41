"""nanoGPT's ``train.bin`` / ``val.bin``: flat little-endian uint16 token ids, no header, the
end-of-text id appended after each document (``data/openwebtext/prepare.py``:
``ids.append(enc.eot_token)``), read by ``train.py`` as ``np.memmap(path, dtype=np.uint16)``;
and ``meta.pkl``, a pickled dict whose ``vocab_size`` ``train.py`` takes as the model's
vocabulary (written here as the tokenizer's largest id + 1, so every id has an embedding row).

There is no document index: boundaries are the end-of-text ids. So a ``separator: none``
dataset is refused unless ``add_eos`` appends one after each document (importing that with
``separator: none`` strips them again: an exact round trip), and uint32 datasets are refused
(``train.py`` reads uint16). ``meta.pkl`` is not read on import (unpickling runs code); the
tokenizer given to import is checked against the ids themselves.
"""
from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from qovaryx_data.errors import FormatError, QovaryxDataError
from qovaryx_data.interop import ExportOptions
from qovaryx_data.interop.stream import (Batch, atomic_out, doc_batches, out_folder,
                                         split_stream)

SEPARATED = True
SPLITS = ("train", "val")
_CHUNK = 1 << 24        # tokens read at a time


def find_inputs(path: Path) -> dict[str, list[Path]]:
    """A .bin file (one dataset), or a folder with train.bin [and val.bin]."""
    if path.is_file():
        return {"": [path]}
    found = {s: [path / f"{s}.bin"] for s in SPLITS if (path / f"{s}.bin").is_file()}
    if not found:
        raise QovaryxDataError(f"{path}: no train.bin or val.bin; give a nanoGPT data folder or "
                               f"one .bin file")
    return found if len(found) > 1 else {"": next(iter(found.values()))}


def read(files: list[Path], eos_id: int | None) -> Iterator[Batch]:
    def pieces():
        for i, f in enumerate(files):
            size = f.stat().st_size
            if size % 2:
                raise FormatError(f"{f}: {size} bytes, an odd number: not a file of uint16 tokens "
                                  f"(nanoGPT's .bin), or truncated")
            if size:
                mm = np.memmap(f, mode="r", dtype="<u2")
                for a in range(0, len(mm), _CHUNK):
                    yield i, np.asarray(mm[a:a + _CHUNK])

    for files_of, tokens, lengths in split_stream(pieces(), eos_id, "after"):
        yield Batch(files_of, tokens, lengths)


def write(ds, out: Path, split: str | None, opts: ExportOptions, eos_id: int | None,
          several: bool = False) -> tuple[list[Path], int]:
    """out/{split}.bin (train.bin for a dataset without a split) and out/meta.pkl."""
    if ds.dtype.itemsize != 2:
        raise QovaryxDataError(f"{ds.path}: uint32 tokens (the tokenizer's largest id is "
                               f"{ds.info['tokenizer'].get('max_id')}), and nanoGPT's train.py "
                               f"reads uint16 only; export to megatron or llmc instead")
    policy = ds.info["separator"]["policy"]
    if policy == "none" and not opts.add_eos:
        raise QovaryxDataError(f"{ds.path}: packed with `separator: none`, and nanoGPT files have "
                               f"no document index (end-of-text ids are the only boundaries); pass "
                               f"--add-eos to append one after each document (import with "
                               f"--separator none removes them again)")
    if policy == "none" and eos_id is None:
        raise QovaryxDataError(f"{ds.path}: --add-eos needs an end-of-text id, and the tokenizer "
                               f"has no <|endoftext|>")
    out_folder(out, "nanogpt")
    path = out / f"{split or 'train'}.bin"
    tmp = atomic_out(path)
    written = 0
    try:
        with open(tmp, "wb") as f:
            for tokens, lengths in doc_batches(ds):
                if policy == "none":
                    tokens = np.insert(tokens, np.cumsum(lengths), eos_id)
                f.write(np.ascontiguousarray(tokens, "<u2").tobytes())
                written += len(tokens)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    tok = ds.info["tokenizer"]
    meta = {"vocab_size": int(tok.get("max_id", tok["vocab_size"] - 1)) + 1,
            "eos_id": eos_id, "tokenizer_hash": tok["hash"], "format": "qovaryx-nanogpt-export"}
    meta_path = out / "meta.pkl"
    tmp = atomic_out(meta_path)
    tmp.write_bytes(pickle.dumps(meta))
    os.replace(tmp, meta_path)
    return [path, meta_path], written
