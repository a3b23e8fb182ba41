"""The worker side of a pack: one work unit's rows -> tokens, metadata and pixels, as a part file.

A worker reads its unit (`sources.iter_unit`), tokenizes the rows in chunks
(`encode_batch_fast`), decodes images once, checks labels and positions, and writes the unit
atomically to ``<out>/.work/unit-NNNNNN.npz`` (its pixels to ``unit-NNNNNN.pix``): the finished
parts a killed run resumes from. `load_part` reads one back for the assembler (writer.py).
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from qovaryx_data.errors import ImageError, QovaryxDataError, SourceError
from qovaryx_data.fileio import atomic_write, stat_pair, temp_name
from qovaryx_data.packing.plan import PackSettings
from qovaryx_data.tokenizer import load_tokenizer

SKIP_SAMPLE_LIMIT = 100        # (file, row, reason) examples kept in dataset.json


def part_path(work: Path, key: tuple[int, int | None]) -> Path:
    """The part of task `key`: (k, None) work unit k, (k, j) decoded piece j of stream unit k."""
    k, j = key
    return work / (f"unit-{k:06d}.npz" if j is None else f"unit-{k:06d}-{j:05d}.npz")


_W: dict[str, Any] = {}


def init_worker(settings: PackSettings, in_process: bool = False) -> None:
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


def process_unit(arg) -> tuple[str, dict]:
    """Tokenize one task ``(key, unit)``: ("ok", counts), or ("error", the SourceError as data:
    keyword-only exception attributes do not pickle)."""
    key, unit = arg
    try:
        return "ok", _tokenize_unit(key, unit)
    except SourceError as e:
        return "error", {"module": type(e).__module__, "cls": type(e).__name__,
                         "message": str(e), "path": e.path, "row": e.row, "reason": e.reason}


CHUNK_ROWS = 4096               # rows tokenized per encode_batch call inside a unit
CHUNK_PIXEL_BYTES = 64 << 20   # ... or fewer, once their decoded images reach this many bytes


def _tokenize_unit(key: tuple, unit) -> dict:
    """Read, tokenize and store one unit as a part (unit-K.npz, plus unit-K.pix with its pixels);
    returns its counts. Rows are handled in chunks, so a worker holds at most one chunk of
    decoded images; pixels go straight to disk. A byte range of a line format also records its
    newlines (rows of a unit planned without line numbers count from 1: the assembler adds the
    lines of the file's earlier units)."""
    from qovaryx_data.sources import Skipped, iter_unit, unit_newlines

    s: PackSettings = _W["settings"]
    cfg = s.source_configs[unit.source_index]
    part = _UnitPart(part_path(Path(s.work_dir), key), s)
    if is_line_range(unit, cfg):
        part.newlines = unit_newlines(unit)
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
    return part.finish(key)


def is_line_range(unit, cfg) -> bool:
    """A byte range of a line-structured file (text line/paragraph, jsonl), read from disk."""
    return (not unit.members and unit.data is None
            and (unit.format == "jsonl" or (unit.format == "text" and cfg.split != "file")))


class _UnitPart:
    """The documents of one work unit, collected chunk by chunk and written as a part."""

    def __init__(self, path: Path, settings: PackSettings):
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
        self.newlines = 0          # newlines in the unit's byte range (line formats)

    def note_image_file(self, path: str, stat: tuple[int, int] | None = None) -> None:
        """Record an image file's (size, mtime_ns), taken before it was read (or stat it now)."""
        if path not in self.image_files:
            self.image_files[path] = [path, *(stat or stat_pair(path))]

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

    def finish(self, key: tuple) -> dict:
        """Write the part atomically: pixels first, the .npz (the completion mark) last."""
        lengths = np.array([len(x) for x in self.ids], np.int64)
        total = int(lengths.sum())
        tokens = np.fromiter(chain.from_iterable(self.ids), dtype=_W["dtype"], count=total)
        if self.pix_file is not None:
            self.pix_file.close()
            os.replace(self.pix_tmp, self.pix_path)
        c = self.cols
        meta = {"unit": list(key), "newlines": self.newlines,
                "files": list(self.file_ids), "skipped": dict(self.skipped),
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
    def write(tmp: Path) -> None:   # no fsync: a part is cheap to redo (see load_part)
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_part(path: Path, image_shape) -> dict:
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


def drop_parts_with_changed_images(work: Path) -> None:
    """A finished unit of an interrupted run whose image files changed since is redone."""
    for part in sorted(work.glob("unit-*.npz")):
        try:
            with np.load(part) as z:
                files = json.loads(z["meta"].tobytes())["image_files"]
        except Exception:  # noqa: BLE001 - unreadable: load_part reports and deletes it
            continue
        if any(stat_pair(p) != (size, mtime_ns) for p, size, mtime_ns in files):
            part.unlink()
            part.with_suffix(".pix").unlink(missing_ok=True)
