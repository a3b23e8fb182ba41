"""The row readers, one per input format: a work unit's bytes or rows -> `Row`s (or the
`SourceError` of a bad row, which `sources.iter_unit` raises or turns into a counted skip).

Line formats (text, jsonl) read their unit's byte range; ``.jsonl.zst`` is decoded frame by
frame (`zst_chunks`: windows up to the source's ``zstd_max_window``); parquet reads whole row
groups and ``hf`` a row range of a ``save_to_disk`` folder. Every message names the file and the
line (1-based) or row (0-based), and the fix.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qovaryx_data.errors import SourceError
from qovaryx_data.sources import (_PARAGRAPH_SEP, ZSTD_MAX_WINDOW, Row, SourceConfig, WorkUnit,
                                  _load_hf, hf_fields)


def _decode(data: bytes, cfg: SourceConfig, path: str, line: int) -> str | SourceError:
    try:
        return data.decode("utf-8", errors=cfg.errors)
    except UnicodeDecodeError as e:
        bad_line = line + data.count(b"\n", 0, e.start)
        return SourceError(f"{path} line {bad_line}: invalid UTF-8 (byte 0x{data[e.start]:02x}); fix the "
                           f"file's encoding, or accept replacement characters with errors: replace "
                           f"(CLI --errors replace)", path=path, row=bad_line, reason="invalid_utf8")


def _read_range(unit: WorkUnit) -> bytes:
    if unit.data is not None:   # a decoded piece of a stream unit
        return unit.data
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
            yield from _text_row(raw[:-1] if raw.endswith(b"\r") else raw, cfg, unit.path, unit.first_line + i)
    else:  # paragraph
        pos, line = 0, unit.first_line
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
        yield from _json_row(raw, cfg, unit.path, unit.first_line + i)
    if unit.trailing_error is not None:   # the decoding error that ended a stream unit's piece
        message, row, reason = unit.trailing_error
        yield SourceError(message, path=unit.path, row=row, reason=reason)


def decoded_units(unit: WorkUnit, cfg: SourceConfig, piece_bytes: int) -> Iterator[WorkUnit]:
    """A stream unit (a large .jsonl.zst) decoded once, in order, as pieces of about
    `piece_bytes` decoded bytes, each cut just after the first newline at or past `piece_bytes`
    (so the cuts depend only on the decoded text): format "jsonl" units holding their lines
    (`data`) and their first line number. A decoding error ends the last piece (its
    `trailing_error`), after every complete line before it, as `_read_jsonl_zst` does.

    >>> # decoded b'a\\nbb\\nccc\\n' with piece_bytes=2 -> pieces b'a\\nbb\\n' (lines 1-2), b'ccc\\n' (3)
    """
    def piece(data: bytes, line: int, error=None) -> WorkUnit:
        return WorkUnit(unit.source_index, unit.path, "jsonl", unit.start, unit.end, line,
                        data=data, trailing_error=error)

    buf, line = b"", 1
    try:
        for chunk in zst_chunks(unit.path, cfg.zstd_max_window):
            buf += chunk
            while len(buf) >= piece_bytes:
                cut = buf.find(b"\n", piece_bytes - 1) + 1
                if cut == 0:
                    break
                yield piece(buf[:cut], line)
                line += buf.count(b"\n", 0, cut)
                buf = buf[cut:]
    except ZstdReadError as e:
        whole = buf.rfind(b"\n") + 1              # the line in progress is not read, as before
        err = e.source_error(unit.path, line + buf.count(b"\n", 0, whole))
        yield piece(buf[:whole], line, (str(err), err.row, err.reason))
        return
    if buf:
        yield piece(buf, line)


def _read_jsonl_zst(unit: WorkUnit, cfg: SourceConfig) -> Iterator[Row | SourceError]:
    line, pending = 1, b""
    try:
        for chunk in zst_chunks(unit.path, cfg.zstd_max_window):
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


def zst_chunks(path: str, max_window: int = ZSTD_MAX_WINDOW,
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

    row = unit.first_line
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


# format -> reader of one unit (sources.iter_unit dispatches here)
READERS = {"text": _read_text, "jsonl": _read_jsonl, "jsonl.zst": _read_jsonl_zst,
           "parquet": _read_parquet, "hf": _read_hf}
