"""Labelled-image test helpers: read (and write) IDX files, write PNG images plus a JSONL source.

The images are Fashion-MNIST (../shared/images: 28x28 greyscale, labels 0..9) or, on a clone
without ../shared, rendered price charts in the same layout (labels 0..3; tests/conftest.py
`fashion_mnist_dir`). Tests assert only what holds for both.

IDX (../shared/DATA.md): big-endian header -- magic (0x0803 images, 0x0801 labels), count, then
rows and cols for images -- followed by uint8 data. Only the first `n` items are decompressed.
"""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]
DECISION_NAMES = ["hold", "buy", "sell", "abstain"]   # 4 decision classes: label = class % 4


def read_idx(path: Path, n: int | None = None) -> np.ndarray:
    """The first `n` items of an IDX .gz file: (n, rows, cols) images or (n,) labels, uint8."""
    with gzip.open(path, "rb") as f:
        magic, count = struct.unpack(">II", f.read(8))
        if magic == 0x0803:
            rows, cols = struct.unpack(">II", f.read(8))
            shape = (rows, cols)
        elif magic == 0x0801:
            shape = ()
        else:
            raise ValueError(f"{path}: not an IDX uint8 images/labels file (magic {magic:#x})")
        n = count if n is None else min(n, count)
        size = n * int(np.prod(shape, dtype=np.int64))
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: truncated (wanted {size} bytes, got {len(data)})")
    return np.frombuffer(data, dtype=np.uint8).reshape((n, *shape))


def write_idx(path: Path, data: np.ndarray, magic: int) -> None:
    """Write `data` (uint8 (n, rows, cols) images with magic 0x0803, or (n,) labels with 0x0801) as
    an IDX .gz file that `read_idx` reads back."""
    if (magic, data.ndim) not in ((0x0803, 3), (0x0801, 1)) or data.dtype != np.uint8:
        raise ValueError(f"{path}: IDX magic {magic:#x} takes uint8 {'images' if magic == 0x0803 else 'labels'}")
    with gzip.GzipFile(path, "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        f.write(struct.pack(">II", magic, len(data)))
        if data.ndim == 3:
            f.write(struct.pack(">II", *data.shape[1:]))
        f.write(data.tobytes())


def load_fashion_mnist(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) uint8) from the training split: labels 0..9 for
    Fashion-MNIST, 0..3 for the rendered-charts fallback."""
    images = read_idx(folder / "train-images-idx3-ubyte.gz", n)
    labels = read_idx(folder / "train-labels-idx1-ubyte.gz", n)
    return images, labels


def caption(label: int) -> str:
    return f"A greyscale photo of a {CLASS_NAMES[label].lower()}."


def write_png_source(out: Path, images: np.ndarray, labels: np.ndarray, *,
                     name: str = "rows.jsonl", text_only: list[str] | None = None) -> Path:
    """Write images as PNG files under out/img/ plus out/<name>: one JSONL row per image with
    ``text`` (a caption), ``image`` (path relative to the JSONL's folder) and ``label``
    (class % 4, an int 0..3). `text_only` rows (no image, no label) are interleaved every 3rd row.
    Returns the JSONL path."""
    (out / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    extra = list(text_only or [])
    for i, (a, y) in enumerate(zip(images, labels)):
        rel = f"img/{i:05d}.png"
        Image.fromarray(a).save(out / rel, format="PNG")
        rows.append({"text": caption(int(y)), "image": rel, "label": int(y) % 4})
        if extra and i % 3 == 2:
            rows.append({"text": extra.pop(0)})
    rows.extend({"text": t} for t in extra)
    path = out / name
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path
