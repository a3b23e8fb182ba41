"""qovaryx_data.hf: a datasets.Dataset as a pack source, and PackedDataset.to_hf (see also
test_multimodal_pack.py for the full hf -> pack -> to_hf round trip)."""
from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from fmnist import DECISION_NAMES, caption, load_fashion_mnist
from qovaryx_data.hf import as_source, save_dataset
from qovaryx_data.images import ImageSpec, load_image
from qovaryx_data.sources import Row, effective_config, iter_unit, plan_units

N = 40


def fmnist_hf(fashion_mnist_dir: Path, n: int = N) -> tuple[datasets.Dataset, np.ndarray, np.ndarray]:
    """A real datasets.Dataset: caption text, an Image() column and a ClassLabel column."""
    images, labels = load_fashion_mnist(fashion_mnist_dir, n)
    features = datasets.Features({"text": datasets.Value("string"), "picture": datasets.Image(),
                                  "verdict": datasets.ClassLabel(names=DECISION_NAMES)})
    from PIL import Image

    ds = datasets.Dataset.from_dict(
        {"text": [caption(int(y)) for y in labels],
         "picture": [Image.fromarray(a) for a in images],
         "verdict": [int(y) % 4 for y in labels]}, features=features)
    return ds, images, labels


def test_as_source_saves_once_and_sources_reads_images_and_labels(fashion_mnist_dir, tmp_path):
    ds, images, labels = fmnist_hf(fashion_mnist_dir)
    spec = as_source(ds, tmp_path / "work")
    assert spec.format == "hf" and Path(spec.path).is_dir()
    folder = Path(spec.path)
    mtimes = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert as_source(ds, tmp_path / "work").path == spec.path            # same object: same folder,
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes  # not rewritten
    assert [p.name for p in (tmp_path / "work" / "hf-sources").iterdir()] == [folder.name]

    # no image/decision configuration: the Image() and ClassLabel columns are detected
    cfg = effective_config(spec.source_config())
    assert (cfg.image_field, cfg.decision_field) == ("picture", "verdict")
    assert cfg.decision_labels == tuple(DECISION_NAMES)
    rows = [r for u in plan_units(cfg) for r in iter_unit(u, cfg)]
    assert all(isinstance(r, Row) for r in rows) and len(rows) == N
    img_spec = ImageSpec(size=(28, 28), mode="L")
    for r, a, y in zip(rows, images, labels):
        assert r.text == caption(int(y)) and r.decision == int(y) % 4
        assert isinstance(r.image, bytes)                                  # embedded, not a path
        got = load_image(r.image, root=folder, spec=img_spec, where=f"{r.path} row {r.row}")
        np.testing.assert_array_equal(got[:, :, 0], a)


def test_save_dataset_refuses_other_objects(tmp_path):
    d = datasets.Dataset.from_dict({"text": ["a"]})
    with pytest.raises(ValueError, match="DatasetDict.*dataset\\['train'\\]"):
        save_dataset(datasets.DatasetDict({"train": d}), tmp_path)
    with pytest.raises(TypeError, match="datasets.Dataset"):
        save_dataset([{"text": "a"}], tmp_path)
