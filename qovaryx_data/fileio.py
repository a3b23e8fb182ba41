"""Atomic writes: a file appears complete under its name, or not at all (temp file + rename)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The temp file beside `path` (same folder, so the rename is atomic): `.NAME.tmp-PID`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[Path], None], *,
                 fsync: bool = False) -> Path:
    """Write `content` to a temp file beside `path`, then rename it over `path`.

    `content` is text (UTF-8, "\\n" newlines), bytes, or a function that writes the temp file
    whose path it is given (for writers that want a path, such as `Tokenizer.save`). With
    `fsync`, the data reaches the disk before the rename. On any error the temp file is removed
    and `path` is left as it was.

        >>> atomic_write(Path("out/x.json"), '{"a": 1}\\n')      # doctest: +SKIP
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, str):
            with open(tmp, "w", encoding="utf-8", newline="\n") as f:
                f.write(content)
        else:
            with open(tmp, "wb") as f:
                f.write(content)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def stat_pair(path: str) -> tuple[int, int]:
    """(size, mtime_ns) of a file; (-1, -1) when it is missing or unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns
