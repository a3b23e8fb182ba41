"""The writer of a packed dataset: the mirror of reader.py (docs/FORMAT.md, the public contract).

`DatasetWriter` streams documents (the parts of a pack run, in order) into the shards of one
dataset folder, rolling to a new shard once one holds ``shard_tokens`` tokens; `ShardWriter` writes
one shard's ``.tok``, ``.idx``, ``.meta.arrow`` and ``.img`` under temp names and renames them when
complete. `DatasetWriter.finish` copies the tokenizer's files, checksums every file and writes
``dataset.json`` last.
"""
from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import numpy as np

from qovaryx_data.format import (HEADER_SIZE, IMAGE_FILES, IMAGE_FILES_FORMAT, IMAGE_FILES_VERSION,
                                 META_COLUMNS, SOURCE_FILES, SOURCE_FILES_FORMAT,
                                 SOURCE_FILES_VERSION, file_entry, meta_schema, pack_header,
                                 padded)
from qovaryx_data.manifest import write_dataset_json, write_json_atomic
from qovaryx_data.sources import NUM_DECISION_CLASSES
from qovaryx_data.tokenizer import TOKENIZER_FILE, TOKENIZER_FILES

SHARD_FILE = re.compile(r"shard-\d{5}\.(tok|idx|meta\.arrow|img)")
_OWN_TEMP = re.compile(r"\.(shard-\d{5}\.(tok|idx|meta\.arrow|img)\.tmp|"
                       r"(dataset|image_files|source_files)\.json\.tmp-\d+)")


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


class ShardWriter:
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


class DatasetWriter:
    """Streams documents into the shards of one output dataset; documents never span shards."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, image_spec,
                 n_sources: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.image_shape = tuple(image_spec.shape) if image_spec is not None else (0, 0, 0)
        self.shards: list[dict] = []
        self.cur: ShardWriter | None = None
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
                self.cur = ShardWriter(self.folder, len(self.shards), self.dtype, self.image_shape)
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
               sources: list[str], image_files: list, source_files: list[str]) -> None:
        if self.cur is not None and (self.cur.n_docs or not self.shards):
            self.shards.append(self.cur.close())
        elif self.cur is not None:
            self.cur.abort()
        self.cur = None
        if not self.shards:  # no documents at all: one empty shard keeps readers uniform
            self.cur = ShardWriter(self.folder, 0, self.dtype, self.image_shape)
            self.shards.append(self.cur.close())
            self.cur = None
        copy_tokenizer(tokenizer_src, self.folder / "tokenizer")
        remove_stale(self.folder, self.shards)
        write_json_atomic(self.folder / SOURCE_FILES,
                          {"format": SOURCE_FILES_FORMAT, "version": SOURCE_FILES_VERSION,
                           "files": source_files})
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
        files[SOURCE_FILES] = file_entry(self.folder / SOURCE_FILES)
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
            "source_files_file": SOURCE_FILES,
            "files": files,
        })
        write_dataset_json(self.folder, info)


def copy_tokenizer(src: Path, dst: Path) -> None:
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


def remove_stale(folder: Path, shards: list[dict]) -> None:
    """Delete shard files of an older pack that this one does not list, and temp files of a run
    killed mid-write: only names a pack writes (shard-00012.tok, .shard-00012.tok.tmp, ...)."""
    keep = {v for sh in shards for k, v in sh.items() if k in ("tokens", "offsets", "meta", "images")
            and v}
    for p in folder.iterdir():
        if ((SHARD_FILE.fullmatch(p.name) and p.name not in keep) or _OWN_TEMP.fullmatch(p.name)) \
                and p.is_file():
            p.unlink()
