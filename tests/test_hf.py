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
    cfg = effective_config(spec)
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


# ---- hf -> pack -> to_hf round trip ----

def _mixed_hf(fashion_mnist_dir: Path, n: int = N):
    """Rows with image + label, image only, label only, and text only (None cells)."""
    from PIL import Image

    images, labels = load_fashion_mnist(fashion_mnist_dir, n)
    features = datasets.Features({"text": datasets.Value("string"), "picture": datasets.Image(),
                                  "verdict": datasets.ClassLabel(names=DECISION_NAMES)})
    pics = [Image.fromarray(a) if i % 4 != 2 else None for i, a in enumerate(images)]
    verdicts = [int(y) % 4 if i % 4 != 1 else None for i, y in enumerate(labels)]
    texts = [caption(int(y)) for y in labels]
    return datasets.Dataset.from_dict({"text": texts, "picture": pics, "verdict": verdicts},
                                      features=features), images, pics, verdicts, texts


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, fashion_mnist_dir, small_tokenizer):
    from qovaryx_data import PackedDataset
    from qovaryx_data.manifest import PackManifest
    from qovaryx_data.packer import pack

    work = tmp_path_factory.mktemp("hf")
    hf, images, pics, verdicts, texts = _mixed_hf(fashion_mnist_dir)
    # the Python API: an in-memory datasets.Dataset as a source, no image/label configuration
    m = PackManifest(name="hf", tokenizer=str(small_tokenizer), sources=(as_source(hf, work),),
                     output=str(work / "out"), images={"size": [28, 28], "mode": "L"})
    pack(m, workers=1, progress=False)
    return PackedDataset(work / "out"), images, pics, verdicts, texts, small_tokenizer


def test_round_trip_hf_pack_to_hf(round_trip, tmp_path):
    from tokenizers import Tokenizer

    ds, images, pics, verdicts, texts, tok_dir = round_trip
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    assert len(ds) == N and list(ds.decision_names) == DECISION_NAMES
    out = ds.to_hf()
    assert isinstance(out, datasets.Dataset) and len(out) == N
    assert isinstance(out.features["image"], datasets.Image)
    assert isinstance(out.features["decision"], datasets.ClassLabel)
    assert out.features["decision"].names == DECISION_NAMES
    for i, rec in enumerate(out):
        assert rec["input_ids"] == ds[i].tokens.tolist()
        assert rec["input_ids"] == tok.encode(texts[i], add_special_tokens=False).ids + [0]
        if pics[i] is None:
            assert rec["image"] is None
        else:
            np.testing.assert_array_equal(np.asarray(rec["image"]), images[i])
        assert rec["decision"] == verdicts[i]
        if verdicts[i] is not None:
            assert rec["decision_position"] == len(rec["input_ids"]) - 1
    # the export is cached by content: a second call reuses the same Arrow file
    assert ds.to_hf().cache_files == out.cache_files


def test_to_hf_iterable_streams_the_same_rows(round_trip):
    ds, images, pics, verdicts, *_ = round_trip
    it = ds.to_hf(iterable=True)
    assert isinstance(it, datasets.IterableDataset)
    assert it.features["decision"].names == DECISION_NAMES
    got = list(it)
    assert len(got) == N
    for i, rec in enumerate(got):
        assert rec["input_ids"] == ds[i].tokens.tolist() and rec["decision"] == verdicts[i]
        assert (rec["image"] is None) == (pics[i] is None)
        if pics[i] is not None:
            np.testing.assert_array_equal(np.asarray(rec["image"]), images[i])
    # row ranges are shards, so DataLoader workers split the stream; order is kept
    from qovaryx_data.hf import to_hf

    sharded = to_hf(ds, iterable=True, rows_per_shard=16)
    assert sharded.num_shards == 3
    assert [r["input_ids"] for r in sharded] == [ds[i].tokens.tolist() for i in range(N)]


def test_pack_dataset_directly_text_only_and_idempotent(tmp_path, small_tokenizer, kjv_path):
    from qovaryx_data import PackedDataset
    from qovaryx_data.hf import pack_dataset

    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f).rstrip("\n") for _ in range(30)]
    hf = datasets.Dataset.from_dict({"verse": verses})
    out = tmp_path / "out"
    first = pack_dataset(hf, tokenizer=small_tokenizer, out=out, text_field="verse",
                         shard_tokens=200, workers=1, progress=False)
    assert not first.up_to_date and first.documents == 30
    assert (tmp_path / "out.sources" / "hf-sources").is_dir()
    again = pack_dataset(hf, tokenizer=small_tokenizer, out=out, text_field="verse",
                         shard_tokens=200, workers=1, progress=False)
    assert again.up_to_date                                   # same Dataset: nothing to do
    ds = PackedDataset(out)
    assert len(ds.info["shards"]) > 1                          # several shards, rows in order
    exported = ds.to_hf()
    assert list(exported.features) == ["input_ids"]
    tok = ds.load_tokenizer()
    assert exported["input_ids"] == [tok.encode(v, add_special_tokens=False).ids + [0]
                                     for v in verses]
    with pytest.raises(TypeError, match="unknown option.*'text_feild'"):
        pack_dataset(hf, tokenizer=small_tokenizer, out=out, text_feild="verse")


def test_pack_a_datasetdict_folder_by_split(tmp_path, small_tokenizer, kjv_path):
    """A save_to_disk DatasetDict packs one split (`split: NAME`, the datasets convention)."""
    from qovaryx_data import PackedDataset
    from qovaryx_data.manifest import PackManifest, SourceSpec
    from qovaryx_data.packer import pack

    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f).rstrip("\n") for _ in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": verses[:30]}),
                          "test": datasets.Dataset.from_dict({"text": verses[30:]})}
                         ).save_to_disk(tmp_path / "dd")
    for split, want in (("train", verses[:30]), ("test", verses[30:])):
        m = PackManifest(name="dd", tokenizer=str(small_tokenizer), output=str(tmp_path / split),
                         sources=(SourceSpec(path=str(tmp_path / "dd"), split=split),))
        assert pack(m, workers=1, progress=False).documents == len(want)
        ds = PackedDataset(tmp_path / split)
        tok = ds.load_tokenizer()
        assert [tok.decode(d.tokens[:-1].tolist()) for d in ds] == want
