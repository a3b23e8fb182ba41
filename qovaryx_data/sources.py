"""Row readers: every input format becomes a stream of `Row`s, split into fixed-size work units.

A source (one `sources:` entry of a pack manifest, or one `train-bpe` input) is resolved to files,
each file is cut into deterministic `WorkUnit`s that do not depend on shard size or worker count,
and `iter_unit` streams one unit's rows. The packer maps units over a process pool; `train-bpe`
walks them in order through `iter_texts`.

Unit kinds (``start``/``end`` mean different things per format, always end-exclusive):

=================  ====================================  =========================================
format / split     unit                                  start, end
=================  ====================================  =========================================
text, file         the whole file (one document)         0, file size
text, line         ~unit_bytes, cut after a newline      byte offsets
text, paragraph    ~unit_bytes, cut after a blank line   byte offsets
jsonl              ~unit_bytes, cut after a newline      byte offsets
jsonl.zst          the whole file (zstd is sequential)   0, file size
parquet            whole row groups, ~unit_rows rows     row-group indices
hf (save_to_disk)  ~unit_rows rows                       row indices
=================  ====================================  =========================================

Example: a 2.5 MiB line-split file with ``unit_bytes=1 MiB`` gives three units whose byte ranges
start at 0 and just after the first newline at or past 1 MiB and 2 MiB; every line belongs to
exactly one unit (the one its first byte falls in).
"""
from __future__ import annotations

import functools
import glob as _glob
import io
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from qovaryx_data.errors import SourceError

FORMATS = ("text", "jsonl", "jsonl.zst", "parquet", "hf")
SPLITS = ("file", "line", "paragraph")
ON_ERROR = ("fail", "skip")
DEFAULT_UNIT_BYTES = 1 << 20
DEFAULT_UNIT_ROWS = 8192
NUM_DECISION_CLASSES = 4  # the decision head's classes (docs/CONTRACTS.md)
# zstd frames declare the window (history) their decoder must hold. libzstd refuses more than
# 128 MiB by default; we accept up to 2 GiB, the most `zstd --long=31` writes (a decoder holds at
# most min(window, frame content size) bytes). A source may raise or lower it: zstd_max_window.
ZSTD_MAX_WINDOW = 1 << 31
ZSTD_MIN_WINDOW = 1 << 10

# suffix -> format; checked longest first so ".jsonl.zst" wins over ".zst"
_SUFFIX_FORMATS = (
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
    (".txt", "text"),
)
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # Dataset, DatasetDict
# A paragraph ends at a line break followed by one or more blank (empty or space/tab-only) lines.
_PARAGRAPH_SEP = re.compile(rb"\r?\n(?:[ \t]*\r?\n)+")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class SourceConfig:
    """How to read one source. Mirrors a `sources:` entry of a pack manifest."""

    path: str  # file, directory (searched recursively) or glob; relative paths resolve against base_dir
    format: str | None = None  # None: inferred per file from its extension (hf: a save_to_disk folder)
    split: str = "file"  # text: one document per file | line | blank-line paragraph; hf: the
    #                      DatasetDict split to read (e.g. "train"), for a save_to_disk DatasetDict
    text_field: str = "text"  # jsonl / parquet / hf column holding the text
    image_field: str | None = None  # column holding an image (path relative to the file, or bytes)
    decision_field: str | None = None  # column holding a decision label (int, or a name)
    decision_labels: tuple[str, ...] | None = None  # class names; a string label maps to its index
    decision_position: str = "last"  # "last", or a column holding an index into the row's text tokens
    errors: str = "strict"  # invalid UTF-8: "strict" rejects the row, "replace" substitutes U+FFFD
    auto_fields: bool = True  # hf: an unset image/decision field takes the Image()/ClassLabel column
    num_decision_classes: int = NUM_DECISION_CLASSES  # labels must lie in 0..num_decision_classes-1
    allow_empty: bool = False  # a source that yields no document is an error unless this is set
    zstd_max_window: int = ZSTD_MAX_WINDOW  # .zst: largest frame window (bytes) the decoder accepts

    def __post_init__(self) -> None:
        # messages start with the field name: the manifest prefixes them with "FILE: sources[i]."
        if not self.path:
            raise ValueError("path: must be a non-empty file, folder or glob")
        if self.format is not None and self.format not in FORMATS:
            raise ValueError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.split not in SPLITS and (self.format or _format_of_name(self.path)) not in (None, "hf"):
            raise ValueError(f"split: {self.split!r} is not one of {', '.join(SPLITS)} (any other "
                             f"name is a DatasetDict split, for hf sources only)")
        if not self.split:
            raise ValueError("split: must be a non-empty name")
        if isinstance(self.zstd_max_window, bool) or not isinstance(self.zstd_max_window, int) \
                or self.zstd_max_window < ZSTD_MIN_WINDOW:
            raise ValueError(f"zstd_max_window: bytes, at least {ZSTD_MIN_WINDOW} (zstd's smallest "
                             f"window), got {self.zstd_max_window!r}")
        if self.errors not in ("strict", "replace"):
            raise ValueError(f"errors: {self.errors!r} is not 'strict' or 'replace'")
        if not self.decision_position:
            raise ValueError("decision_position: 'last' or the name of a field")
        if self.decision_labels is not None:
            object.__setattr__(self, "decision_labels", tuple(self.decision_labels))
            if self.decision_field is None:
                raise ValueError("decision_labels: set decision_field too (the column holding labels)")
            if len(set(self.decision_labels)) != len(self.decision_labels):
                raise ValueError("decision_labels: names must be unique")
            if not 1 <= len(self.decision_labels) <= self.num_decision_classes:
                raise ValueError(f"decision_labels: give 1 to {self.num_decision_classes} names, "
                                 f"got {len(self.decision_labels)}")


@dataclass(frozen=True)
class WorkUnit:
    """A fixed, deterministic piece of one input file. Picklable; units are processed independently."""

    source_index: int  # position of the source in the manifest
    path: str  # absolute path of the file (or hf folder)
    format: str  # resolved format of this file
    start: int  # byte offset, row-group index or row index (see the module docstring)
    end: int  # exclusive
    first_row: int = 1  # line number (1-based) at `start` for line formats; row index for parquet/hf


@dataclass
class Row:
    text: str  # "" when the row has no text
    path: str  # source file
    row: int  # 1-based line where the row starts (text, jsonl); 0-based row index (parquet, hf)
    image: bytes | str | None = None  # encoded bytes, or a path relative to the source file's folder
    decision: int | None = None  # mapped and range-checked class id
    decision_position: int | None = None  # None: the last text token; else an index into the text tokens


@dataclass
class Skipped:
    path: str
    row: int | None
    reason: str  # stable code: empty, malformed_json, missing_field, non_string_text, invalid_utf8, ...
    message: str


# ----------------------------------------------------------------------------- resolving inputs

def infer_format(path: Path) -> str:
    """Format of one input by its name: ``a.jsonl.zst`` -> ``"jsonl.zst"``; a save_to_disk folder -> ``"hf"``."""
    if path.is_dir():
        if _is_hf_folder(path):
            return "hf"
        raise SourceError(f"{path}: a folder that is not a `datasets` save_to_disk folder "
                          f"(no {' or '.join(_HF_MARKERS)})", path=str(path), reason="unknown_format")
    fmt = _format_of_name(path.name)
    if fmt is not None:
        return fmt
    raise SourceError(
        f"{path}: cannot tell the format from the name; use .txt, .jsonl, .jsonl.zst or .parquet, "
        f"or give the format explicitly (manifest `format:`, CLI --format)", path=str(path),
        reason="unknown_format")


def _format_of_name(name: str) -> str | None:
    """The format a file name's extension says (``a.jsonl.zst`` -> ``"jsonl.zst"``), else None."""
    name = name.lower()
    return next((fmt for suffix, fmt in _SUFFIX_FORMATS if name.endswith(suffix)), None)


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in _HF_MARKERS)


def resolve_inputs(path_or_glob: str, base_dir: Path | None = None, format: str | None = None) -> list[Path]:
    """Files (or hf folders) named by a path, a directory (searched recursively) or a glob, sorted.

    >>> resolve_inputs("corpus/*_gut.txt", base_dir=Path("/data"))   # doctest: +SKIP
    [PosixPath('/data/corpus/hamlet_gut.txt'), ...]
    """
    p = Path(path_or_glob).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = Path(base_dir) / p
    if _GLOB_CHARS.search(str(p)):
        matches = [Path(m) for m in sorted(_glob.glob(str(p), recursive=True))]
        if not matches:
            raise SourceError(f"{path_or_glob}: the glob matches nothing (looked for {p}); check the "
                              f"pattern and the folder it is relative to", path=str(p), reason="no_match")
    elif p.exists():
        matches = [p]
    else:
        raise SourceError(f"{path_or_glob}: no such file or folder ({p})", path=str(p), reason="no_match")

    out: list[Path] = []
    for m in matches:
        if m.is_dir() and format != "hf" and not _is_hf_folder(m):
            found = sorted(f for f in m.rglob("*") if f.is_file() and _known_file(f, format))
            found = [f for f in found if not any(_is_hf_folder(d) for d in f.parents if d != m)]
            out.extend(found)
        else:
            out.append(m)
    if not out:
        raise SourceError(f"{path_or_glob}: the folder holds no input files (.txt, .jsonl, .jsonl.zst, "
                          f".parquet)", path=str(p), reason="no_match")
    return [f.resolve() for f in out]


def _known_file(f: Path, format: str | None) -> bool:
    name = f.name.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return format is None or format == fmt
    return format == "text" and not name.startswith(".")


# ----------------------------------------------------------------------------- planning

def plan_units(cfg: SourceConfig, source_index: int = 0, base_dir: Path | None = None,
               unit_bytes: int = DEFAULT_UNIT_BYTES, unit_rows: int = DEFAULT_UNIT_ROWS, *,
               files: list[Path] | None = None) -> list[WorkUnit]:
    """Cut one source into work units (see the module docstring). Deterministic for the same files.
    `files`: the source's `resolve_inputs`, when the caller already has them."""
    if unit_bytes < 1 or unit_rows < 1:
        raise ValueError("unit_bytes and unit_rows must be positive")
    units: list[WorkUnit] = []
    for f in files if files is not None else resolve_inputs(cfg.path, base_dir, cfg.format):
        fmt = cfg.format or infer_format(f)
        if fmt == "text" and cfg.split not in SPLITS:
            raise SourceError(f"{f}: split {cfg.split!r} is for `datasets` DatasetDict folders; a "
                              f"text file's split is one of {', '.join(SPLITS)}", path=str(f),
                              reason="unknown_split")
        if fmt == "hf":
            units.extend(_plan_hf(cfg, source_index, f, unit_rows))
        elif fmt == "parquet":
            units.extend(_plan_parquet(cfg, source_index, f, unit_rows))
        elif fmt == "jsonl.zst" or (fmt == "text" and cfg.split == "file"):
            _check_readable(f)
            units.append(WorkUnit(source_index, str(f), fmt, 0, f.stat().st_size, 1))
        else:  # line-structured: text line/paragraph, jsonl
            sep = _PARAGRAPH_SEP if (fmt == "text" and cfg.split == "paragraph") else None
            units.extend(_plan_bytes(source_index, f, fmt, unit_bytes, sep))
    return units


def _check_readable(f: Path) -> None:
    if not f.is_file():
        raise SourceError(f"{f}: not a file", path=str(f), reason="no_match")
    try:
        with open(f, "rb"):
            pass
    except OSError as e:
        raise SourceError(f"{f}: cannot be read ({e.strerror})", path=str(f), reason="unreadable") from None


def _plan_bytes(si: int, f: Path, fmt: str, unit_bytes: int, sep: re.Pattern | None) -> list[WorkUnit]:
    """Byte ranges of ~unit_bytes, each cut just after a newline (or a blank-line separator)."""
    _check_readable(f)
    size = f.stat().st_size
    cuts = [0]
    with open(f, "rb") as fh:
        while cuts[-1] + unit_bytes < size:
            cut = _next_cut(fh, cuts[-1] + unit_bytes, size, sep)
            if cut >= size:
                break
            cuts.append(cut)
        cuts.append(size)
        # line number at each cut: one streaming pass counting newlines
        lines, first_rows, pos = 1, [], 0
        fh.seek(0)
        for c in cuts[:-1]:
            while pos < c:
                chunk = fh.read(min(1 << 22, c - pos))
                lines += chunk.count(b"\n")
                pos += len(chunk)
            first_rows.append(lines)
    return [WorkUnit(si, str(f), fmt, a, b, r) for a, b, r in zip(cuts[:-1], cuts[1:], first_rows)]


def _next_cut(fh: io.BufferedReader, pos: int, size: int, sep: re.Pattern | None) -> int:
    """Smallest offset >= pos that starts a line (sep None) or a paragraph (after a blank line)."""
    start = max(pos - 1, 0)
    window = 1 << 16
    while True:
        fh.seek(start)
        buf = fh.read(window)
        if sep is None:
            i = buf.find(b"\n")
            if i >= 0:
                return start + i + 1
        else:
            for m in sep.finditer(buf):
                # the run is complete when a byte that cannot extend it follows inside the buffer
                # (greedy matching stopped there), or at the end of the file
                if buf[m.end():].lstrip(b" \t\r") or start + len(buf) >= size:
                    return start + m.end()
        if start + len(buf) >= size:
            return size
        window *= 2


def _plan_parquet(cfg: SourceConfig, si: int, f: Path, unit_rows: int) -> list[WorkUnit]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises several types for non-parquet input
        raise SourceError(f"{f}: not a readable parquet file ({e})", path=str(f), reason="corrupt_file") from None
    _check_columns(cfg, f, pf.schema_arrow.names)
    units, group_start, rows, row0 = [], 0, 0, 0
    for g in range(pf.metadata.num_row_groups):
        rows += pf.metadata.row_group(g).num_rows
        if rows >= unit_rows or g == pf.metadata.num_row_groups - 1:
            units.append(WorkUnit(si, str(f), "parquet", group_start, g + 1, row0))
            row0 += rows
            group_start, rows = g + 1, 0
    return units


def _plan_hf(cfg: SourceConfig, si: int, f: Path, unit_rows: int) -> list[WorkUnit]:
    ds = _load_hf(f, cfg.split)
    cfg = hf_fields(cfg, ds.features)
    _check_columns(cfg, f, list(ds.column_names))
    n = len(ds)
    return [WorkUnit(si, str(f), "hf", a, min(a + unit_rows, n), a) for a in range(0, n, unit_rows)]


def _check_columns(cfg: SourceConfig, f: Path, names: list[str]) -> None:
    wanted = {"image_field": cfg.image_field, "decision_field": cfg.decision_field}
    if cfg.decision_position != "last":
        wanted["decision_position"] = cfg.decision_position
    multimodal = cfg.image_field is not None or cfg.decision_field is not None
    if not multimodal:
        wanted["text_field"] = cfg.text_field
    for key, col in wanted.items():
        if col is not None and col not in names:
            raise SourceError(f"{f}: no column {col!r} (set by {key}); the file has columns {names}. "
                              f"Fix {key} in the manifest (or --text-field)", path=str(f),
                              reason="missing_column")


def _load_hf(f: Path, split: str = "file"):
    """The dataset in a save_to_disk folder, loaded once per process while the folder is unchanged
    (its Arrow files are memory-mapped, so keeping it costs no copy). A DatasetDict folder needs
    the source's `split` (e.g. ``split: train``), as `datasets` asks for one split."""
    try:  # a re-save rewrites the folder and its state files: that changes the key
        key = tuple(p.stat().st_mtime_ns for p in (f, *(f / m for m in _HF_MARKERS)) if p.exists())
    except OSError:
        key = ()
    ds = _load_hf_cached(str(f), key)
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            return ds[split]
        why = "needs `split:` naming one" if split in SPLITS else f"has no split {split!r}"
        raise SourceError(f"{f}: holds a DatasetDict with splits {list(ds)}; the source {why}: "
                          f"set `split: {next(iter(ds), 'train')}` (one of {list(ds)}) in the "
                          f"manifest source", path=str(f), reason="unknown_split")
    if split not in SPLITS:
        raise SourceError(f"{f}: holds one Dataset, not a DatasetDict, so it has no split "
                          f"{split!r}; remove `split:` from the source", path=str(f),
                          reason="unknown_split")
    return ds


@functools.lru_cache(maxsize=8)
def _load_hf_cached(folder: str, key: tuple):
    import datasets

    f = Path(folder)
    try:
        return datasets.load_from_disk(str(f))
    except Exception as e:
        raise SourceError(f"{f}: not a readable `datasets` save_to_disk folder ({e})", path=str(f),
                          reason="corrupt_file") from None


def hf_fields(cfg: SourceConfig, features: Any) -> SourceConfig:
    """Fill image/decision fields from `datasets` features the config leaves unset.

    An ``Image()`` column becomes the image field, a ``ClassLabel`` column the decision field, with
    its names as ``decision_labels``. Explicit settings win.
    """
    import datasets

    if not cfg.auto_fields:
        return cfg
    image_field, decision_field, labels = cfg.image_field, cfg.decision_field, cfg.decision_labels
    if image_field is None:
        found = [k for k, v in features.items() if isinstance(v, datasets.Image)]
        image_field = found[0] if len(found) == 1 else None
    if decision_field is None:
        found = [k for k, v in features.items() if isinstance(v, datasets.ClassLabel)]
        decision_field = found[0] if len(found) == 1 else None
    feat = features.get(decision_field) if decision_field else None
    if labels is None and isinstance(feat, datasets.ClassLabel):
        labels = tuple(feat.names)
        if len(labels) > cfg.num_decision_classes:
            raise SourceError(f"{cfg.path}: ClassLabel column {decision_field!r} has {len(labels)} classes but "
                              f"the decision head has {cfg.num_decision_classes}; map the labels to at most "
                              f"{cfg.num_decision_classes} classes first (datasets' align_labels_with_mapping "
                              f"or cast_column), or set auto_fields: false to pack it as text only",
                              path=cfg.path, reason="bad_label")
    if (image_field, decision_field, labels) == (cfg.image_field, cfg.decision_field, cfg.decision_labels):
        return cfg
    return replace(cfg, image_field=image_field, decision_field=decision_field, decision_labels=labels)


def effective_config(cfg: SourceConfig, base_dir: Path | None = None, *,
                     files: list[Path] | None = None) -> SourceConfig:
    """The config as the readers apply it: for hf sources, Image()/ClassLabel columns auto-detected.
    `files`: the source's `resolve_inputs`, when the caller already has them."""
    files = files if files is not None else resolve_inputs(cfg.path, base_dir, cfg.format)
    if (cfg.format or infer_format(files[0])) == "hf":
        return hf_fields(cfg, _load_hf(files[0], cfg.split).features)
    return cfg


# ----------------------------------------------------------------------------- reading

def iter_unit(unit: WorkUnit, cfg: SourceConfig, on_error: str = "fail") -> Iterator[Row | Skipped]:
    """Rows of one unit, in order. Bad rows raise `SourceError` (``fail``) or yield `Skipped` (``skip``);
    empty rows (no text, image or label) are always yielded as ``Skipped(reason="empty")``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error {on_error!r} must be one of {ON_ERROR}")
    reader = {"text": _read_text, "jsonl": _read_jsonl, "jsonl.zst": _read_jsonl_zst,
              "parquet": _read_parquet, "hf": _read_hf}[unit.format]
    for item in reader(unit, cfg):
        if isinstance(item, SourceError):
            if on_error == "fail":
                raise item
            yield Skipped(item.path or unit.path, item.row, item.reason, str(item))
        elif not item.text.strip() and item.image is None and item.decision is None:
            yield Skipped(item.path, item.row, "empty", f"{item.path} row {item.row}: empty document")
        else:
            yield item


def iter_texts(inputs: list[str], *, format: str | None = None, split: str = "file",
               text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """Every non-empty document's text of every input, in order, streamed. Raises on a bad row."""
    for inp in inputs:
        cfg = SourceConfig(path=str(inp), format=format, split=split, text_field=text_field, errors=errors)
        for unit in plan_units(cfg):
            for item in iter_unit(unit, cfg, "fail"):
                if isinstance(item, Row) and item.text:
                    yield item.text


def _decode(data: bytes, cfg: SourceConfig, path: str, line: int) -> str | SourceError:
    try:
        return data.decode("utf-8", errors=cfg.errors)
    except UnicodeDecodeError as e:
        bad_line = line + data.count(b"\n", 0, e.start)
        return SourceError(f"{path} line {bad_line}: invalid UTF-8 (byte 0x{data[e.start]:02x}); fix the "
                           f"file's encoding, or accept replacement characters with errors: replace "
                           f"(CLI --errors replace)", path=path, row=bad_line, reason="invalid_utf8")


def _read_range(unit: WorkUnit) -> bytes:
    with open(unit.path, "rb") as fh:
        fh.seek(unit.start)
        return fh.read(unit.end - unit.start)


def _read_text(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    data = _read_range(unit)
    if cfg.split == "file":
        text = _decode(data, cfg, unit.path, 1)
        yield text if isinstance(text, SourceError) else Row(text, unit.path, 1)
    elif cfg.split == "line":
        for i, raw in enumerate(_split_lines(data)):
            yield from _text_row(raw[:-1] if raw.endswith(b"\r") else raw, cfg, unit.path, unit.first_row + i)
    else:  # paragraph
        pos, line = 0, unit.first_row
        for m in _PARAGRAPH_SEP.finditer(data):
            yield from _text_row(data[pos:m.start()], cfg, unit.path, line, blank_is_separator=True)
            line += data.count(b"\n", pos, m.end())
            pos = m.end()
        yield from _text_row(data[pos:], cfg, unit.path, line, blank_is_separator=True)


def _text_row(raw: bytes, cfg: SourceConfig, path: str, line: int,
              blank_is_separator: bool = False) -> Iterator[Row | SourceError]:
    if blank_is_separator and not raw.strip(b" \t\r\n"):
        return  # leading/trailing blank lines of a paragraph unit are separators, not documents
    if blank_is_separator:  # a paragraph never ends with its last line's break (the file's last one)
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
    text = _decode(raw, cfg, path, line)
    yield text if isinstance(text, SourceError) else Row(text, path, line)


def _split_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def _read_jsonl(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    for i, raw in enumerate(_split_lines(_read_range(unit))):
        yield from _json_row(raw, cfg, unit.path, unit.first_row + i)


def _read_jsonl_zst(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    line, pending = 1, b""
    try:
        for chunk in _zst_chunks(unit.path, cfg.zstd_max_window):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            for raw in lines:
                yield from _json_row(raw, cfg, unit.path, line)
                line += 1
    except ZstdReadError as e:
        yield e.source_error(unit.path, line)
        return
    if pending:
        yield from _json_row(pending, cfg, unit.path, line)


class ZstdReadError(Exception):
    """A .zst file could not be decoded: corrupt or truncated data, or (`window` set) a frame
    whose window is larger than the source's zstd_max_window."""

    def __init__(self, detail: str, window: int | None = None, limit: int | None = None):
        super().__init__(detail)
        self.window, self.limit = window, limit

    def source_error(self, path: str, line: int) -> SourceError:
        if self.window is not None:
            return SourceError(
                f"{path}: a zstd frame near line {line} needs a {_mib(self.window)} decoding "
                f"window, more than this source allows ({_mib(self.limit)}, zstd_max_window); "
                f"the file is valid (written with a long window, e.g. `zstd --long`): allow it with "
                f"`zstd_max_window: {self.window}` in the manifest source (each worker then may hold "
                f"that much memory), or recompress it without --long", path=path, row=line,
                reason="zstd_window")
        return SourceError(f"{path}: unreadable zstd data near line {line} ({self}); the file is "
                           f"corrupt or truncated: re-create or re-download it", path=path, row=line,
                           reason="corrupt_zst")


def _mib(n: int | None) -> str:
    return f"{(n or 0) / (1 << 20):,.0f} MiB" if (n or 0) >= 1 << 20 else f"{n} bytes"


def _zst_chunks(path: str, max_window: int = ZSTD_MAX_WINDOW,
                read_size: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) zstd file. Raises ZstdReadError for corrupt data, a
    file that ends inside a frame, or a frame whose window exceeds `max_window` bytes.

    (zstandard's stream_reader stops quietly at a truncated frame, so frames are walked by hand.)
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor(max_window_size=max_window)
    dobj, head = dctx.decompressobj(), b""      # head: the current frame's first bytes
    with open(path, "rb") as fh:
        while data := fh.read(read_size):
            while data:
                if len(head) < _ZSTD_FRAME_HEADER_MAX:
                    head += data[:_ZSTD_FRAME_HEADER_MAX - len(head)]
                try:
                    out = dobj.decompress(data)
                except zstandard.ZstdError as e:
                    raise _zstd_error(e, head, max_window) from None
                if out:
                    yield out
                data = dobj.unused_data if dobj.eof else b""
                if dobj.eof:
                    dobj, head = dctx.decompressobj(), b""
    if head:
        raise ZstdReadError("the file ends inside a zstd frame (truncated)")


_ZSTD_FRAME_HEADER_MAX = 18   # bytes: magic, descriptor, window, dictionary id, content size


def _zstd_error(e: Exception, head: bytes, max_window: int) -> ZstdReadError:
    import zstandard

    try:
        window = zstandard.get_frame_parameters(head).window_size
    except zstandard.ZstdError:
        window = 0
    if window > max_window:
        return ZstdReadError(str(e), window, max_window)
    return ZstdReadError(str(e))


def _json_row(raw: bytes, cfg: SourceConfig, path: str, line: int) -> Iterator[Row | SourceError]:
    if not raw.strip():
        return  # a blank line holds no row
    where = f"{path} line {line}"
    text = _decode(raw, cfg, path, line)
    if isinstance(text, SourceError):
        yield text
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        yield SourceError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or remove the "
                          f"line (a pack manifest's on_error: skip skips such rows)", path=path, row=line,
                          reason="malformed_json")
        return
    except RecursionError:   # Python's json parser recurses once per nesting level
        yield SourceError(f"{where}: JSON nested too deeply to parse (more levels than Python's "
                          f"recursion limit, {sys.getrecursionlimit()}); flatten or remove the "
                          f"line (on_error: skip skips such rows)", path=path, row=line,
                          reason="malformed_json")
        return
    if not isinstance(obj, dict):
        yield SourceError(f"{where}: a JSONL row must be a JSON object, got {type(obj).__name__}",
                          path=path, row=line, reason="malformed_json")
        return
    text = obj.get(cfg.text_field)
    if b"\\u" in raw and isinstance(text, str):  # a \uXXXX escape may encode a lone surrogate
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            if cfg.errors == "strict":
                yield SourceError(f"{where}: field {cfg.text_field!r} holds a lone surrogate "
                                  f"({text[e.start]!r}), which is not valid Unicode text; fix the "
                                  f"line, or accept replacement characters with errors: replace "
                                  f"(CLI --errors replace)", path=path, row=line, reason="invalid_utf8")
                return
            obj[cfg.text_field] = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    yield _record_row(obj, cfg, path, line, where)


def _record_row(obj: dict, cfg: SourceConfig, path: str, row: int, where: str) -> Row | SourceError:
    """A row from a mapping (JSON object, parquet/hf record): text, image, decision, position."""
    multimodal = cfg.image_field is not None or cfg.decision_field is not None
    text = obj.get(cfg.text_field)
    if text is None:
        if cfg.text_field not in obj and not multimodal:
            return SourceError(f"{where}: no field {cfg.text_field!r} (fields: {sorted(obj)}); set "
                               f"text_field (CLI --text-field) to the field holding the text",
                               path=path, row=row, reason="missing_field")
        if not multimodal:   # a row with an image or a label may have no text; others must
            return SourceError(f"{where}: field {cfg.text_field!r} is null; a text-only row needs "
                               f"a string (\"\" for no text): fix the row, or skip such rows "
                               f"with on_error: skip", path=path, row=row, reason="null_text")
        text = ""
    elif not isinstance(text, str):
        return SourceError(f"{where}: field {cfg.text_field!r} must be a string, got "
                           f"{type(text).__name__}", path=path, row=row, reason="non_string_text")

    image = obj.get(cfg.image_field) if cfg.image_field else None
    if isinstance(image, dict):  # datasets Image() / parquet struct {bytes, path}
        image = image.get("bytes") or image.get("path")
    if image is not None and not isinstance(image, (str, bytes)):
        return SourceError(f"{where}: field {cfg.image_field!r} must be a path or bytes, got "
                           f"{type(image).__name__}", path=path, row=row, reason="bad_image_field")

    decision = obj.get(cfg.decision_field) if cfg.decision_field else None
    if decision is not None:
        decision = _label_id(decision, cfg, path, row, where)
        if isinstance(decision, SourceError):
            return decision

    position = None
    if cfg.decision_position != "last" and decision is not None:
        position = obj.get(cfg.decision_position)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            return SourceError(f"{where}: field {cfg.decision_position!r} (decision_position) must be a "
                               f"non-negative token index, got {position!r}", path=path, row=row,
                               reason="bad_position")
    return Row(text, path, row, image, decision, position)


def _label_id(value: Any, cfg: SourceConfig, path: str, row: int, where: str) -> int | SourceError:
    n = len(cfg.decision_labels) if cfg.decision_labels is not None else cfg.num_decision_classes
    if isinstance(value, str) and cfg.decision_labels is not None:
        if value in cfg.decision_labels:
            return cfg.decision_labels.index(value)
        return SourceError(f"{where}: unknown decision label {value!r}; known: {list(cfg.decision_labels)}",
                           path=path, row=row, reason="bad_label")
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (string labels need decision_labels in the manifest)" if isinstance(value, str) else ""
        return SourceError(f"{where}: decision label must be an int in 0..{n - 1}, got {value!r}{hint}",
                           path=path, row=row, reason="bad_label")
    if not 0 <= value < n:
        return SourceError(f"{where}: decision label {value} is out of range 0..{n - 1}",
                           path=path, row=row, reason="bad_label")
    return value


def _columns(cfg: SourceConfig) -> list[str]:
    cols = [cfg.text_field, cfg.image_field, cfg.decision_field]
    if cfg.decision_position != "last":
        cols.append(cfg.decision_position)
    return list(dict.fromkeys(c for c in cols if c))


def _read_parquet(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    import pyarrow.parquet as pq

    row = unit.first_row
    try:
        pf = pq.ParquetFile(unit.path)
        cols = [c for c in _columns(cfg) if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(row_groups=list(range(unit.start, unit.end)), columns=cols):
            records = batch.to_pylist()
            yield from _batch_rows(records, cfg, unit.path, row)
            row += len(records)
    except (OSError, ValueError) as e:  # pyarrow's ArrowException types derive from these
        yield _corrupt(unit, row, e)


def _corrupt(unit: WorkUnit, row: int, e: Exception) -> SourceError:
    return SourceError(f"{unit.path} row {row}: unreadable {unit.format} data ({e}); the file is corrupt "
                       f"or truncated: re-create it (the rest of its work unit, rows before "
                       f"{_unit_end_row(unit)}, is not read)", path=unit.path, row=row, reason="corrupt_file")


def _unit_end_row(unit: WorkUnit) -> str:
    return f"row group {unit.end}" if unit.format == "parquet" else f"row {unit.end}"


def _read_hf(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    ds = _load_hf(Path(unit.path), cfg.split)
    cfg = hf_fields(cfg, ds.features)
    cols = [c for c in _columns(cfg) if c in ds.column_names]
    try:
        records = ds.with_format("arrow").select_columns(cols)[unit.start:unit.end].to_pylist()
    except (OSError, ValueError) as e:
        yield _corrupt(unit, unit.start, e)
        return
    yield from _batch_rows(records, cfg, unit.path, unit.start)


def _batch_rows(records: list[dict], cfg: SourceConfig, path: str, row0: int) -> Iterator[Row | SourceError]:
    for i, rec in enumerate(records):
        yield _record_row(rec, cfg, path, row0 + i, f"{path} row {row0 + i}")
