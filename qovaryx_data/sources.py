"""Row readers: every input format becomes a stream of `Row`s, split into fixed-size work units.

A source (one `sources:` entry of a pack manifest, or one `train-bpe` input) is resolved to files,
each file is cut into deterministic `WorkUnit`s that do not depend on shard size or worker count,
and `iter_unit` streams one unit's rows (the readers of each format are in readers.py). The
packer maps units over a process pool; `train-bpe` walks them in order through `iter_texts`.

Unit kinds (``start``/``end`` mean different things per format, always end-exclusive):

=================  ====================================  =========================================
format / split     unit                                  start, end
=================  ====================================  =========================================
text, file         the whole file (one document)         0, file size
text, line         ~unit_bytes, cut after a newline      byte offsets
text, paragraph    ~unit_bytes, cut after a blank line   byte offsets
jsonl              ~unit_bytes, cut after a newline      byte offsets
jsonl.zst          the whole file (zstd is sequential)   0, file size (`stream` when >= unit_bytes)
small whole files  a group of ~unit_bytes (`members`)    the first member's
parquet            whole row groups, ~unit_rows rows     row-group indices
hf (save_to_disk)  ~unit_rows rows                       row indices
=================  ====================================  =========================================

Whole files smaller than ``unit_bytes`` (text ``file``, small jsonl / jsonl.zst files) are
grouped, in order, into one unit of about ``unit_bytes`` (`WorkUnit.members`): a corpus of many
small files makes few units. A ``.jsonl.zst`` file of ``unit_bytes`` or more is a *stream* unit:
the packer decodes it once, in order, and cuts the decoded lines into pieces of about
``unit_bytes`` (`readers.decoded_units`) that its workers tokenize in parallel.

Example: a 2.5 MiB line-split file with ``unit_bytes=1 MiB`` gives three units whose byte ranges
start at 0 and just after the first newline at or past 1 MiB and 2 MiB; every line belongs to
exactly one unit (the one its first byte falls in).
"""
from __future__ import annotations

import functools
import glob as _glob
import io
import re
from dataclasses import dataclass, field, replace
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
    # line number (1-based) at `start` for line formats; row index for parquet/hf. None: not
    # counted at planning (plan_units(count_lines=False)): the unit's rows are numbered from 1 and
    # the caller adds the lines before `start` (the `unit_newlines` of the file's earlier units)
    first_row: int | None = 1
    members: tuple[WorkUnit, ...] = ()  # a group of small whole files, read in this order
    stream: bool = False  # a large .jsonl.zst: the packer decodes it once (readers.decoded_units)
    # a decoded piece of a stream unit (format "jsonl"): its lines, and the decoding error
    # (message, row, reason) that ends it, if any
    data: bytes | None = field(default=None, repr=False, compare=False)
    trailing_error: tuple[str, int, str] | None = None

    @property
    def first_line(self) -> int:
        """The line (1-based) or row number of the unit's first row as the readers count it."""
        return 1 if self.first_row is None else self.first_row


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
            hf = functools.cache(_is_hf_folder)   # each folder checked once, not once per file
            out.extend(f for f in found if not any(hf(d) for d in _parents_below(f, m)))
        else:
            out.append(m)
    if not out:
        raise SourceError(f"{path_or_glob}: the folder holds no input files (.txt, .jsonl, .jsonl.zst, "
                          f".parquet)", path=str(p), reason="no_match")
    return [f.resolve() for f in out]


def _parents_below(f: Path, top: Path) -> Iterator[Path]:
    """The folders between `f` and `top` (both excluded): a file inside a `datasets` folder
    there is part of that dataset, not an input of its own."""
    for d in f.parents:
        if d == top:
            return
        yield d


def _known_file(f: Path, format: str | None) -> bool:
    name = f.name.lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if name.endswith(suffix):
            return format is None or format == fmt
    return format == "text" and not name.startswith(".")


# ----------------------------------------------------------------------------- planning

def plan_units(cfg: SourceConfig, source_index: int = 0, base_dir: Path | None = None,
               unit_bytes: int = DEFAULT_UNIT_BYTES, unit_rows: int = DEFAULT_UNIT_ROWS, *,
               files: list[Path] | None = None, count_lines: bool = True) -> list[WorkUnit]:
    """Cut one source into work units (see the module docstring). Deterministic for the same files.
    `files`: the source's `resolve_inputs`, when the caller already has them. `count_lines=False`
    leaves `first_row` None on every unit but a file's first (no pass over the file here: the
    packer's workers count each unit's newlines, `unit_newlines`)."""
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
            size = f.stat().st_size
            units.append(WorkUnit(source_index, str(f), fmt, 0, size, 1,
                                  stream=fmt == "jsonl.zst" and size >= unit_bytes))
        else:  # line-structured: text line/paragraph, jsonl
            sep = _PARAGRAPH_SEP if (fmt == "text" and cfg.split == "paragraph") else None
            units.extend(_plan_bytes(source_index, f, fmt, unit_bytes, sep, count_lines))
    return _group_small_files(units, unit_bytes)


def _group_small_files(units: list[WorkUnit], unit_bytes: int) -> list[WorkUnit]:
    """Runs of whole files smaller than unit_bytes become groups of about unit_bytes (in order).

    >>> # files of 300, 500, 400 and 2,000 bytes with unit_bytes=1,000
    >>> # -> a group [300, 500, 400] (1,200 bytes: it closed once it reached 1,000), then [2,000]
    """
    out: list[WorkUnit] = []
    run: list[WorkUnit] = []
    size = 0

    def close() -> None:
        nonlocal size
        if len(run) == 1:
            out.append(run[0])
        elif run:
            first = run[0]
            out.append(WorkUnit(first.source_index, first.path, first.format, 0, first.end,
                                first.first_row, members=tuple(run)))
        run.clear()
        size = 0

    for u in units:
        # a byte range that starts at 0 and ends before unit_bytes is a whole file (a larger
        # file's first range ends at or past unit_bytes)
        small = u.format in ("text", "jsonl", "jsonl.zst") and u.start == 0 and u.end < unit_bytes
        if not small:
            close()
            out.append(u)
            continue
        run.append(u)
        size += u.end
        if size >= unit_bytes:
            close()
    close()
    return out


def _check_readable(f: Path) -> None:
    if not f.is_file():
        raise SourceError(f"{f}: not a file", path=str(f), reason="no_match")
    try:
        with open(f, "rb"):
            pass
    except OSError as e:
        raise SourceError(f"{f}: cannot be read ({e.strerror})", path=str(f), reason="unreadable") from None


def _plan_bytes(si: int, f: Path, fmt: str, unit_bytes: int, sep: re.Pattern | None,
                count_lines: bool = True) -> list[WorkUnit]:
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
        if not count_lines:
            return [WorkUnit(si, str(f), fmt, a, b, 1 if a == 0 else None)
                    for a, b in zip(cuts[:-1], cuts[1:])]
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
    if unit.members:   # a group of small files
        for member in unit.members:
            yield from iter_unit(member, cfg, on_error)
        return
    from qovaryx_data.readers import READERS

    for item in READERS[unit.format](unit, cfg):
        if isinstance(item, SourceError):
            if on_error == "fail":
                raise item
            yield Skipped(item.path or unit.path, item.row, item.reason, str(item))
        elif not item.text.strip() and item.image is None and item.decision is None:
            yield Skipped(item.path, item.row, "empty", f"{item.path} row {item.row}: empty document")
        else:
            yield item


def unit_newlines(unit: WorkUnit) -> int:
    """Newlines in a byte-range unit (the packer's workers count them, so that planning need not
    read the file: the next unit of the file starts that many lines later)."""
    n, pos = 0, unit.start
    with open(unit.path, "rb") as fh:
        fh.seek(pos)
        while pos < unit.end:
            chunk = fh.read(min(1 << 22, unit.end - pos))
            if not chunk:
                break
            n += chunk.count(b"\n")
            pos += len(chunk)
    return n


def shift_rows(message: str, path: str, delta: int) -> str:
    """`message` about a row of `path` numbered within its unit, renumbered by `delta` lines:
    every "PATH line N" / "PATH row N" becomes N + delta (messages name rows that way).

    >>> shift_rows("/d/a.txt line 3: invalid UTF-8", "/d/a.txt", 100)
    '/d/a.txt line 103: invalid UTF-8'
    """
    if not delta:
        return message
    pattern = re.compile(re.escape(path) + r" (line|row) (\d+)\b")
    return pattern.sub(lambda m: f"{path} {m.group(1)} {int(m.group(2)) + delta}", message)


def iter_texts(inputs: list[str], *, format: str | None = None, split: str = "file",
               text_field: str = "text", errors: str = "strict") -> Iterator[str]:
    """Every non-empty document's text of every input, in order, streamed. Raises on a bad row."""
    for inp in inputs:
        cfg = SourceConfig(path=str(inp), format=format, split=split, text_field=text_field, errors=errors)
        for unit in plan_units(cfg):
            for item in iter_unit(unit, cfg, "fail"):
                if isinstance(item, Row) and item.text:
                    yield item.text
