"""End to end on real images: Fashion-MNIST PNG + JSONL rows -> pack -> PackedDataset / collate.

Covers issue 4's packing and reading: exact pixels and labels back, a shard mixing text-only rows
with image/label rows, and every bad input (missing, corrupt, truncated, a real decompression
bomb, path escapes incl. a symlink, bad labels, a position outside the row), failing with the
file and row named, or counted with ``on_error: skip``.
"""
from __future__ import annotations

import io
import re
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from tokenizers import Tokenizer

from fmnist import DECISION_NAMES, load_fashion_mnist, write_png_source
from qovaryx_data import PackedDataset, SourceError
from qovaryx_data.errors import ManifestError
from qovaryx_data.collate import collate, row_example, text_window
from qovaryx_data.images import ImageSpec, contact_sheet, load_image
from qovaryx_data.packer import pack

N_IMAGES = 300
N_VERSES = 200
IMAGES = {"size": [28, 28], "mode": "L", "resize": "fit", "max_pixels": 40_000_000}
MM = {"format": "jsonl", "text_field": "text", "image_field": "image", "decision_field": "label",
      "decision_labels": DECISION_NAMES}


def pack_manifest(folder: Path, tokenizer: Path, sources: list[dict], *, on_error: str = "fail",
                  images: dict | None = IMAGES, **extra) -> Path:
    """Write <folder>/pack.yaml and pack it (one worker, no progress bar) into <folder>/out."""
    m = {"name": "mm", "tokenizer": str(tokenizer), "output": "out", "sources": sources,
         "on_error": on_error, **extra}
    if images is not None:
        m["images"] = images
    (folder / "pack.yaml").write_text(yaml.safe_dump(m), encoding="utf-8")
    pack(folder / "pack.yaml", workers=1, progress=False)
    return folder / "out"


@pytest.fixture(scope="module")
def fm(tmp_path_factory, fashion_mnist_dir, kjv_path, small_tokenizer):
    """Fashion-MNIST rows (image + caption + label) interleaved with text-only verses, plus a
    second, plain-text source of more verses, packed into one shard."""
    root = tmp_path_factory.mktemp("fm")
    images, labels = load_fashion_mnist(fashion_mnist_dir, N_IMAGES)
    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f).rstrip("\n") for _ in range(2 * N_VERSES)]
    jsonl = write_png_source(root / "src", images, labels, text_only=verses[:N_VERSES])
    (root / "src" / "verses.txt").write_text("\n".join(verses[N_VERSES:]) + "\n", encoding="utf-8")
    out = pack_manifest(root, small_tokenizer,
                        [{"path": "src/rows.jsonl", **MM},
                         {"path": "src/verses.txt", "format": "text", "split": "line"}],
                        unit_bytes=4096)                            # several units per source
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    return {"ds": PackedDataset(out), "out": out, "root": root, "images": images, "labels": labels,
            "rows": rows, "verses": verses, "tok": tok, "jsonl": jsonl}


def test_pixels_labels_and_text_read_back_exactly(fm):
    ds, rows, images, labels, tok = fm["ds"], fm["rows"], fm["images"], fm["labels"], fm["tok"]
    assert len(ds) == len(rows) + N_VERSES == N_IMAGES + 2 * N_VERSES
    assert ds.image_shape == (28, 28, 1)
    assert list(ds.decision_names) == DECISION_NAMES
    assert len(ds.multimodal_doc_indices) == N_IMAGES
    assert len(ds.text_doc_indices) == 2 * N_VERSES
    seen = 0
    for i in range(len(rows)):
        doc = ds[i]
        assert Path(doc.source).name == "rows.jsonl"
        row = rows[doc.row - 1]                                   # 1-based line number
        ids = tok.encode(row["text"], add_special_tokens=False).ids
        assert doc.tokens.tolist() == ids + [0]                   # text + <|endoftext|>
        if "image" in row:
            k = int(row["image"][4:9])                            # img/00017.png -> 17
            assert doc.image.shape == (28, 28, 1) and doc.image.dtype == np.uint8
            np.testing.assert_array_equal(doc.image[:, :, 0], images[k])   # same size, no resize
            assert not doc.image.flags.owndata                     # a view into the memmap
            assert doc.image.ctypes.data % 8 == 0                  # 8-byte aligned
            assert doc.decision == row["label"] == labels[k] % 4
            assert doc.decision_position == len(doc.tokens) - 1    # default: the last token
            seen += 1
        else:
            assert doc.image is None and doc.decision is None and doc.decision_position is None
    assert seen == N_IMAGES
    for j, i in enumerate(range(len(rows), len(ds))):             # the plain-text source
        doc = ds[i]
        assert doc.image is None and doc.decision is None
        assert doc.tokens.tolist() == tok.encode(fm["verses"][N_VERSES + j],
                                                 add_special_tokens=False).ids + [0]


def test_dataset_json_and_contact_sheet(fm, tmp_path):
    ds = fm["ds"]
    info = json.loads((fm["out"] / "dataset.json").read_text())
    assert info["images"]["shape"] == [28, 28, 1] and info["images"]["resize"] == "fit"
    assert info["decision"]["labels"] == DECISION_NAMES
    assert info["skipped"] == {}
    idx = ds.multimodal_doc_indices[:6]
    out = contact_sheet([ds[int(i)].image for i in idx],
                        [DECISION_NAMES[ds[int(i)].decision] for i in idx], tmp_path / "s.png")
    with Image.open(out) as im:
        assert im.size[0] > 28 * 3


def test_images_pack_identically_with_any_worker_count(fm):
    out2 = fm["root"] / "out-2-workers"
    pack(fm["root"] / "pack.yaml", out=out2, workers=2, progress=False)
    one = json.loads((fm["out"] / "dataset.json").read_text())
    two = json.loads((out2 / "dataset.json").read_text())
    assert one["files"] == two["files"]                       # sizes and checksums, .img included
    assert any(name.endswith(".img") for name in one["files"])
    for name in one["files"]:
        if not name.startswith("tokenizer"):
            assert (fm["out"] / name).read_bytes() == (out2 / name).read_bytes(), name


def test_collate_real_batch(fm):
    ds = fm["ds"]
    first_verse = int(ds.text_doc_indices[-N_VERSES])             # the text-only source's docs
    start = int(ds.doc_offsets[first_verse]) + 3
    n = 256
    mm = [int(i) for i in ds.multimodal_doc_indices[:3]]
    batch = collate([text_window(ds, start, n)] + [row_example(ds, i) for i in mm])
    assert batch["input_ids"].shape == (4, n)
    assert batch["input_ids"][0].tolist() == ds.window(start, n).tolist()
    # document ids follow the packed document boundaries
    doc_of = np.searchsorted(ds.doc_offsets, np.arange(start, start + n), side="right") - 1
    assert batch["document_ids"][0].tolist() == (doc_of - doc_of[0]).tolist()
    assert batch["document_ids"][0].max() >= 2                    # verses are short: several docs
    for b, i in enumerate(mm, start=1):
        t = len(ds[i].tokens)
        assert batch["input_ids"][b, :t].tolist() == ds[i].tokens.tolist()
        assert (batch["input_ids"][b, t:] == 1).all() and (batch["labels"][b, t:] == -100).all()
        assert batch["pixel_values"][b, 0].numpy().tolist() == ds[i].image[:, :, 0].tolist()
        assert batch["decision_labels"][b] == ds[i].decision
        assert batch["decision_positions"][b] == t - 1
    assert batch["image_mask"].tolist() == [False, True, True, True]
    assert batch["decision_labels"][0] == -100


def test_collate_batch_drives_the_model(fm):
    """The batch contract end to end: packed rows -> collate -> QovaryxForCausalLM forward and
    backward with the patch encoder and the decision head on (debug preset, 28x28 grey)."""
    import torch

    from qovaryx_model import QovaryxConfig, QovaryxForCausalLM

    ds = fm["ds"]
    torch.manual_seed(0)
    cfg = QovaryxConfig.from_preset("debug", vocab_size=2048, image_channels=1,
                                    chart_patch_encoder_enabled=True, decision_head_enabled=True)
    model = QovaryxForCausalLM(cfg)
    start = int(ds.doc_offsets[int(ds.text_doc_indices[-N_VERSES])])
    examples = [text_window(ds, start, 48)] + [row_example(ds, int(i))
                                                for i in ds.multimodal_doc_indices[:3]]
    batch = collate(examples)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.decision_logits.shape == (4, 4)
    out.loss.backward()
    assert model.model.patch_encoder.conv.weight.grad.abs().sum() > 0


def test_resize_and_rgb_in_the_pack(fm, small_tokenizer, tmp_path):
    """A manifest size/mode/policy other than the source's: the packer stores what load_image
    gives for each file (resized once, at pack time), and to_hf exports it as RGB."""
    spec = {"size": [32, 40], "mode": "RGB", "resize": "crop"}
    src = fm["jsonl"].parent
    out = pack_manifest(tmp_path, small_tokenizer, [{"path": str(fm["jsonl"]), **MM}],
                        images=spec)
    ds = PackedDataset(out)
    assert ds.image_shape == (32, 40, 3)
    want_spec = ImageSpec.from_dict(spec)
    idx = [int(i) for i in ds.multimodal_doc_indices[:20]]
    for i in idx:
        path = fm["rows"][ds[i].row - 1]["image"]
        want = load_image(path, root=src, spec=want_spec, where="test")
        np.testing.assert_array_equal(ds[i].image, want)
    hf = ds.to_hf()
    rec = hf[idx[0]]
    assert rec["image"].mode == "RGB" and rec["image"].size == (40, 32)
    np.testing.assert_array_equal(np.asarray(rec["image"]), ds[idx[0]].image)


# ---- bad input ----

def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


@pytest.fixture(scope="module")
def bad_src(tmp_path_factory, fashion_mnist_dir):
    """A source folder with one good image and every kind of bad one, plus a file outside it."""
    root = tmp_path_factory.mktemp("bad")
    src = root / "src"
    (src / "img").mkdir(parents=True)
    images, _ = load_fashion_mnist(fashion_mnist_dir, 2)
    good = _png(images[0])
    (src / "img" / "good.png").write_bytes(good)
    (src / "img" / "garbage.png").write_bytes(b"definitely not a PNG file")
    (src / "img" / "truncated.png").write_bytes(good[: len(good) // 2])
    bomb = io.BytesIO()
    Image.new("1", (8000, 6000)).save(bomb, format="PNG")        # 48 M pixels in a few KB
    (src / "img" / "bomb.png").write_bytes(bomb.getvalue())
    (root / "outside.png").write_bytes(_png(images[1]))
    os.symlink(root / "outside.png", src / "img" / "link.png")
    return root


BAD_ROWS = {
    "missing_image": {"text": "a", "image": "img/nope.png", "label": 0, "pos": 0},
    "corrupt_image": {"text": "a", "image": "img/garbage.png"},
    "truncated": {"text": "a", "image": "img/truncated.png", "label": 1, "pos": 0},
    "image_too_large": {"text": "a", "image": "img/bomb.png"},
    "escape_dotdot": {"text": "a", "image": "../outside.png", "label": 2, "pos": 0},
    "escape_absolute": {"text": "a", "image": "ABSOLUTE"},
    "escape_symlink": {"text": "a", "image": "img/link.png"},
    "label_out_of_range": {"text": "a", "image": "img/good.png", "label": 4, "pos": 0},
    "unknown_class_name": {"text": "a", "label": "short", "pos": 0},
    "position_outside": {"text": "a few words", "label": "buy", "pos": 999},
}
REASON = {"truncated": "corrupt_image", "escape_dotdot": "path_escape",
          "escape_absolute": "path_escape", "escape_symlink": "path_escape",
          "label_out_of_range": "bad_label", "unknown_class_name": "bad_label",
          "position_outside": "bad_position"}
GOOD = {"text": "Sell the pullover.", "image": "img/good.png", "label": "sell", "pos": 1}


def _write_rows(path: Path, rows: list[dict], root: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            if r.get("image") == "ABSOLUTE":
                r = {**r, "image": str(root / "outside.png")}
            f.write(json.dumps(r) + "\n")


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_fails_naming_file_and_row(case, bad_src, small_tokenizer, tmp_path):
    src = bad_src / "src"
    name = f"{case}.jsonl"
    _write_rows(src / name, [GOOD, BAD_ROWS[case]], bad_src)
    work = tmp_path / "w"
    work.mkdir()
    with pytest.raises(SourceError) as ei:
        pack_manifest(work, small_tokenizer,
                      [{"path": str(src / name), **MM, "decision_position": "pos"}])
    e = ei.value
    assert e.reason == REASON.get(case, case), str(e)
    assert e.row == 2 and Path(e.path).name == name
    assert re.search(rf"{name} (row|line) 2\b", str(e)), str(e)
    assert not (work / "out" / "dataset.json").exists()


def test_bad_rows_skipped_and_counted(bad_src, small_tokenizer, tmp_path):
    src = bad_src / "src"
    rows = [GOOD] + [r for case in BAD_ROWS for r in (BAD_ROWS[case], {"text": f"plain {case}"})]
    _write_rows(src / "all.jsonl", rows, bad_src)
    out = pack_manifest(tmp_path, small_tokenizer,
                        [{"path": str(src / "all.jsonl"), **MM, "decision_position": "pos"}],
                        on_error="skip")
    info = json.loads((out / "dataset.json").read_text())
    want: dict[str, int] = {}
    for case in BAD_ROWS:
        want[REASON.get(case, case)] = want.get(REASON.get(case, case), 0) + 1
    assert info["skipped"] == want
    assert {(s["row"], s["reason"]) for s in info["skipped_sample"]} == {
        (2 + 2 * k, REASON.get(case, case)) for k, case in enumerate(BAD_ROWS)}
    ds = PackedDataset(out)
    assert len(ds) == 1 + len(BAD_ROWS)                           # the good row + every plain row
    good = ds[0]
    np.testing.assert_array_equal(good.image[:, :, 0],
                                  np.asarray(Image.open(src / "img" / "good.png")))
    assert good.decision == DECISION_NAMES.index("sell") and good.decision_position == 1
    assert all(ds[i].image is None for i in range(1, len(ds)))


def test_row_with_image_and_no_text_is_kept(bad_src, small_tokenizer, tmp_path):
    src = bad_src / "src"
    _write_rows(src / "notext.jsonl", [{"image": "img/good.png"}, {"text": "", "label": 3},
                                       {"text": "   "}], bad_src)
    out = pack_manifest(tmp_path, small_tokenizer, [{"path": str(src / "notext.jsonl"), **MM}],
                        on_error="skip")
    ds = PackedDataset(out)
    assert len(ds) == 2 and json.loads((out / "dataset.json").read_text())["skipped"] == {"empty": 1}
    assert ds[0].image is not None and ds[0].decision is None
    assert ds[1].image is None and ds[1].decision == 3
    batch = collate([row_example(ds, 0), row_example(ds, 1)])
    assert batch["image_mask"].tolist() == [True, False]
    assert batch["decision_labels"].tolist() == [-100, 3]


def test_sources_with_different_label_lists_are_refused(small_tokenizer, tmp_path):
    """Each source maps a name to its index in its own list: [hold, buy] and [buy, hold] would
    store "buy" as 1 and as 0 under one list of names. Review finding 1."""
    for name, text in (("a", "alpha"), ("b", "beta")):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"text": text, "y": "buy"}) + "\n")
    (tmp_path / "ids.jsonl").write_text(json.dumps({"text": "gamma", "y": 1}) + "\n")
    src = {"format": "jsonl", "decision_field": "y"}
    with pytest.raises(ManifestError, match=r"sources\[0\] \(.*a\.jsonl\) has decision_labels "
                                            r"\['hold', 'buy'\] but sources\[1\] \(.*b\.jsonl\) has "
                                            r"\['buy', 'hold'\].*same decision_labels in the same"):
        pack_manifest(tmp_path, small_tokenizer,
                      [{"path": "a.jsonl", **src, "decision_labels": ["hold", "buy"]},
                       {"path": "b.jsonl", **src, "decision_labels": ["buy", "hold"]}], images=None)
    assert not (tmp_path / "out" / "dataset.json").exists()

    # The same list everywhere (and a source giving class ids) packs: "buy" is 1 in every source.
    out = pack_manifest(tmp_path, small_tokenizer,
                        [{"path": "a.jsonl", **src, "decision_labels": ["hold", "buy"]},
                         {"path": "b.jsonl", **src, "decision_labels": ["hold", "buy"]},
                         {"path": "ids.jsonl", **src}], images=None)
    ds = PackedDataset(out)
    assert list(ds.decision_names) == ["hold", "buy"]
    assert [ds[i].decision for i in range(len(ds))] == [1, 1, 1]


def test_labelled_row_with_no_tokens_under_separator_none(bad_src, small_tokenizer, tmp_path):
    """`separator: none` + empty text leaves a label nothing to pool at: a clear error naming the
    file, the row and the fix (or a counted skip). Review finding 3."""
    src = bad_src / "src"
    _write_rows(src / "nolast.jsonl", [GOOD, {"text": "", "label": 3}], bad_src)
    sources = [{"path": str(src / "nolast.jsonl"), **MM}]
    with pytest.raises(SourceError) as ei:
        pack_manifest(tmp_path, small_tokenizer, sources, separator="none")
    e = ei.value
    assert (e.reason, e.row, Path(e.path).name) == ("bad_position", 2, "nolast.jsonl")
    assert re.search(r"nolast\.jsonl row 2: the row has a decision label but no tokens .*"
                     r"give the row text, or use `separator: eos`", str(e)), str(e)
    said = str(e).split("row 2:", 1)[1]
    assert "None" not in said and "-1" not in said

    _write_rows(src / "nopos.jsonl", [GOOD, {"text": "", "label": 3, "pos": 0}], bad_src)
    with pytest.raises(SourceError, match=r"nopos\.jsonl row 2: decision position 0 points into "
                                          r"the row's text, but the row has no text tokens"):
        pack_manifest(tmp_path, small_tokenizer,
                      [{"path": str(src / "nopos.jsonl"), **MM, "decision_position": "pos"}])

    out = pack_manifest(tmp_path, small_tokenizer, sources, separator="none", on_error="skip")
    info = json.loads((out / "dataset.json").read_text())
    assert info["skipped"] == {"bad_position": 1} and len(PackedDataset(out)) == 1


def test_validation_side_does_not_depend_on_image_settings(fm, small_tokenizer, tmp_path):
    """A row's train/val side hashes its text, its source image's bytes and its label, not the
    decoded pixels: re-packing with another size or mode moves no row across. Review finding 9."""
    sides = []
    for k, images in enumerate(({"size": [28, 28], "mode": "L"},
                                {"size": [12, 20], "mode": "RGB", "resize": "fit"})):
        work = tmp_path / str(k)
        work.mkdir()
        out = pack_manifest(work, small_tokenizer, [{"path": str(fm["jsonl"]), **MM}],
                            images=images, validation=0.3)
        val = PackedDataset(out / "val")
        sides.append(sorted(val[i].row for i in range(len(val))))
    n_image_rows = sum(1 for r in fm["rows"] if "image" in r)
    assert 0.15 * n_image_rows < len(sides[0]) < 0.45 * len(fm["rows"])
    assert sides[0] == sides[1]

    # The same rows with each image's encoded bytes in a parquet column: the same sides.
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = fm["jsonl"].parent
    table = pa.table({"text": [r["text"] for r in fm["rows"]],
                      "image": [(src / r["image"]).read_bytes() if "image" in r else None
                                for r in fm["rows"]],
                      "label": [r.get("label") for r in fm["rows"]]})
    pq.write_table(table, tmp_path / "rows.parquet")
    out = pack_manifest(tmp_path, small_tokenizer,
                        [{"path": "rows.parquet", **MM, "format": "parquet"}],
                        images={"size": [28, 28], "mode": "L"}, validation=0.3)
    val = PackedDataset(out / "val")
    assert sorted(val[i].row + 1 for i in range(len(val))) == sides[0]   # 0-based parquet rows


def _save_gray(path: Path, value: int, mtime_ns: int) -> None:
    """An 8x8 PNG of one grey value, with an explicit mtime (no reliance on clock resolution)."""
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path, format="PNG")
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_changed_image_file_repacks(small_tokenizer, tmp_path):
    """Image files are inputs too: the pack records each one's (path, size, mtime) and a change
    (or a missing image appearing) means a repack, not stale pixels. Review finding 8."""
    src = tmp_path / "src"
    src.mkdir()
    _save_gray(src / "a.png", 10, 1_000_000_000_000_000_000)
    _write_rows(src / "rows.jsonl", [{"text": "a", "image": "a.png"},
                                     {"text": "c", "image": "c.png"}], tmp_path)
    sources = [{"path": "src/rows.jsonl", **MM}]
    images = {"size": [8, 8], "mode": "L"}
    out = pack_manifest(tmp_path, small_tokenizer, sources, images=images, on_error="skip")
    info = json.loads((out / "dataset.json").read_text())
    rec = json.loads((out / info["image_files"]).read_text())
    assert rec["format"] == "qovaryx-image-files" and "image_files.json" in info["files"]
    assert [(Path(p).name, size) for p, size, _ in rec["files"]] == [
        ("a.png", (src / "a.png").stat().st_size), ("c.png", -1)]        # c.png: missing
    m = tmp_path / "pack.yaml"
    assert pack(m, workers=1, progress=False).up_to_date

    _save_gray(src / "a.png", 200, 1_000_000_000_000_000_001)             # same size, new pixels
    assert not pack(m, workers=1, progress=False).up_to_date
    ds = PackedDataset(out)
    assert len(ds) == 1 and int(ds[0].image.max()) == int(ds[0].image.min()) == 200
    assert pack(m, workers=1, progress=False).up_to_date

    _save_gray(src / "c.png", 30, 1_000_000_000_000_000_000)              # the missing one appears
    assert not pack(m, workers=1, progress=False).up_to_date
    assert [int(PackedDataset(out)[i].image[0, 0, 0]) for i in range(2)] == [200, 30]


def test_a_resumed_pack_redoes_units_whose_images_changed(small_tokenizer, tmp_path):
    """A finished unit left in .work by a failed run is not reused once one of its image files
    changed (image files are not in the fingerprint that keeps .work). Review finding 8."""
    src = tmp_path / "src"
    src.mkdir()
    _save_gray(src / "a.png", 10, 1_000_000_000_000_000_000)
    filler = [{"text": f"filler row {i} " + "x" * 60} for i in range(40)]   # > 2 units of 1 KiB
    _write_rows(src / "rows.jsonl", [{"text": "a", "image": "a.png"}, *filler,
                                     {"text": "late", "image": "late.png"}], tmp_path)
    sources = [{"path": "src/rows.jsonl", **MM}]
    images = {"size": [8, 8], "mode": "L"}
    with pytest.raises(SourceError, match="late.png"):                     # late.png is missing
        pack_manifest(tmp_path, small_tokenizer, sources, images=images, unit_bytes=1024)
    kept = len(list((tmp_path / "out" / ".work").glob("unit-*.npz")))   # kept for a resume
    assert kept >= 2 and (tmp_path / "out" / ".work" / "unit-000000.npz").is_file()
    _save_gray(src / "a.png", 200, 1_000_000_000_000_000_001)
    _save_gray(src / "late.png", 30, 1_000_000_000_000_000_000)
    r = pack(tmp_path / "pack.yaml", workers=1, progress=False)
    ds = PackedDataset(tmp_path / "out")
    assert int(ds[0].image[0, 0, 0]) == 200 and int(ds[len(ds) - 1].image[0, 0, 0]) == 30
    assert r.units_done == r.units - kept + 1                 # the kept units but unit 0 resumed
