"""Stages of a pipeline: each skipped when its inputs are unchanged and its outputs exist, each
timed, a failure named by its stage with the finished ones kept (both demos use this).

    st = Stages(build, force="pack", order=("corpus", "tokenizer", "pack", "train"), label="demo")
    k = st.key("tokenizer", corpus_key, vocab_size)           # a hash of what the stage depends on
    result = st.run("tokenizer", k, [out / "tokenizer.json"], lambda: train_tokenizer(...))

The keys, times and results live in BUILD/stages.json (written atomically after every stage).
`force` redoes that stage and every later one.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

STATE_VERSION = 1


class StageFailed(RuntimeError):
    """A stage raised: the message names it; the stages before it stay done."""


class Stages:
    def __init__(self, build: Path, force: str | None, order: tuple[str, ...], label: str):
        self.path = Path(build) / "stages.json"
        self.label, self.format = label, f"qovaryx-{label}-stages"
        self.state: dict = {}
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") == self.format and data.get("version") == STATE_VERSION:
                self.state = data["stages"]
        self.forced = set(order[order.index(force):]) if force else set()
        self.seconds: dict[str, tuple[float, bool]] = {}  # stage -> (seconds, skipped)

    def say(self, stage: str, msg: str) -> None:
        print(f"[{self.label}:{stage}] {msg}", flush=True)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[], dict], stage: str | None = None):
        """`fn()`'s result (JSON-able), or the recorded one when `name` is up to date. `stage` is the
        --force name when it differs from `name` (e.g. two trainings that are both stage "train")."""
        old = self.state.get(name)
        if (stage or name) not in self.forced and old and old["key"] == key and all(Path(p).exists() for p in outputs):
            self.say(name, f"up to date ({old['seconds']:.1f}s when built)")
            self.seconds[name] = (old["seconds"], True)
            return old["result"]
        t0 = time.perf_counter()
        try:
            result = fn()
        except Exception as e:
            raise StageFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        dt = time.perf_counter() - t0
        self.state[name] = {"key": key, "seconds": dt, "result": result}
        self.seconds[name] = (dt, False)
        from qovaryx_data.fileio import atomic_write

        atomic_write(self.path, json.dumps({"format": self.format, "version": STATE_VERSION, "stages": self.state},
                                           indent=1).encode())
        self.say(name, f"done in {dt:.1f}s")
        return result


def file_key(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def files_key(files: list[Path]) -> str:
    """Names, sizes and mtimes of input files (cheap: nothing is read)."""
    h = hashlib.sha256()
    for f in files:
        st = Path(f).stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]
