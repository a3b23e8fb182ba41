"""PackedDataset on real packs: zero-copy rows and windows, document boundaries, pickling and
DataLoader workers, the tokenizer check, and refusal of damaged data (verify, truncation, magic,
version, missing dataset.json)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from tokenizers import Tokenizer

from fmnist import load_fashion_mnist, write_png_source
from qovaryx_data import PackedDataset, verify
from qovaryx_data.reader import inspect_dataset
from qovaryx_data.cli import main
from qovaryx_data.errors import FormatError, TokenizerError
from qovaryx_data.packer import pack

SHARD_TOKENS = 40_000


def is_memmap_view(a: np.ndarray) -> bool:
    """True when `a` owns no data and its base chain reaches an np.memmap (zero copy)."""
    if a.flags.owndata:
        return False
    while a is not None and not isinstance(a, np.memmap):
        a = a.base if isinstance(a, np.ndarray) else None
    return isinstance(a, np.memmap)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, fashion_mnist_dir, kjv_path, small_tokenizer):
    """KJV verses (text-only) and 12 Fashion-MNIST rows (PNG + caption + label) in shards of 40k
    tokens; the pristine copy is never modified (tests damage copies)."""
    root = tmp_path_factory.mktemp("reader")
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:4000]
    (root / "kjv.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    images, labels = load_fashion_mnist(fashion_mnist_dir, 12)
    write_png_source(root / "img", images, labels)
    m = {"name": "reader", "tokenizer": str(small_tokenizer), "output": "out",
         "shard_tokens": SHARD_TOKENS,
         "images": {"size": [28, 28], "mode": "L"},
         "sources": [{"path": "kjv.txt", "split": "line"},
                     {"path": "img/rows.jsonl", "image_field": "image", "decision_field": "label",
                      "decision_labels": ["hold", "buy", "sell", "abstain"]}]}
    (root / "pack.yaml").write_text(yaml.safe_dump(m))
    pack(root / "pack.yaml", workers=1, progress=False)
    return {"out": root / "out", "verses": verses, "images": images, "labels": labels,
            "tok": small_tokenizer}


@pytest.fixture
def damaged(packed, tmp_path):
    """A fresh copy of the pack to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(packed["out"], dst)
    return dst


def test_rows_and_windows_are_views_of_the_memmap(packed):
    ds = PackedDataset(packed["out"])
    assert len(ds.info["shards"]) >= 3
    doc = ds[5]
    assert is_memmap_view(doc.tokens)
    assert not doc.tokens.flags.writeable
    w = ds.window(100, 2049)
    assert is_memmap_view(w) and len(w) == 2049
    stream = np.concatenate([ds[i].tokens for i in range(len(ds))])
    assert len(stream) == ds.num_tokens
    boundary = ds.info["shards"][0]["num_tokens"]
    crossing = ds.window(boundary - 1000, 2049)                 # copied across the boundary
    assert crossing.flags.owndata and np.array_equal(crossing, stream[boundary - 1000:boundary + 1049])
    for start in (0, 7, boundary, ds.num_tokens - 2049):
        assert np.array_equal(ds.window(start, 2049), stream[start:start + 2049])
    assert len(ds.window(ds.num_tokens - 10, 2049)) == 10 and len(ds.window(ds.num_tokens, 5)) == 0
    with pytest.raises(ValueError):
        ds.window(-1, 5)


def test_document_boundaries_and_negative_index(packed):
    ds = PackedDataset(packed["out"])
    assert ds._doc_offsets is None and ds._meta == [None] * len(ds._meta)   # opening is lazy
    off = ds.doc_offsets
    assert off.dtype == np.int64 and len(off) == len(ds) + 1 and off[0] == 0
    assert off[-1] == ds.num_tokens
    for i in (0, 1, 1999, len(ds) - 1):
        assert np.array_equal(ds.window(off[i], off[i + 1] - off[i]), ds[i].tokens)
    assert ds[-1].row == ds[len(ds) - 1].row
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_text_and_multimodal_rows(packed):
    ds = PackedDataset(packed["out"])
    n_text = len(packed["verses"])
    assert np.array_equal(ds.text_doc_indices, np.arange(n_text))
    assert np.array_equal(ds.multimodal_doc_indices, np.arange(n_text, n_text + 12))
    assert ds.image_shape == (28, 28, 1) and ds.decision_names == ["hold", "buy", "sell", "abstain"]
    assert ds.num_decision_classes == 4
    for k, i in enumerate(ds.multimodal_doc_indices):
        doc = ds[int(i)]
        assert np.array_equal(doc.image[:, :, 0], packed["images"][k])          # exact pixels
        assert is_memmap_view(doc.image)                                         # a view
        assert doc.decision == int(packed["labels"][k]) % 4
        assert doc.decision_position == len(doc.tokens) - 1                      # "last"
    text = ds[0]
    assert text.image is None and text.decision is None and text.decision_position is None


class _EverySeventh:
    """A map-style dataset over a PackedDataset (module level, so spawn can pickle it)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return np.asarray(self.ds[i * 7].tokens, dtype=np.int64)


def test_pickles_by_path_and_reads_in_dataloader_workers(packed):
    import torch

    ds = PackedDataset(packed["out"])
    blob = pickle.dumps(ds)
    assert len(blob) < 500                          # the path, not the data
    again = pickle.loads(blob)
    assert np.array_equal(again[123].tokens, ds[123].tokens)

    loader = torch.utils.data.DataLoader(_EverySeventh(ds), batch_size=None, num_workers=2,
                                         multiprocessing_context="spawn")
    got = [t.tolist() for t in loader]
    assert got == [ds[i * 7].tokens.tolist() for i in range(64)]


def test_tokenizer_argument_refuses_another_tokenizer(packed):
    tok = Tokenizer.from_file(str(packed["tok"] / "tokenizer.json"))
    PackedDataset(packed["out"], tokenizer=tok)                  # the same: fine
    PackedDataset(packed["out"], tokenizer=packed["tok"])        # a folder works too
    tok.add_tokens(["<|something_new|>"])
    with pytest.raises(TokenizerError, match="packed with tokenizer .* but the given tokenizer"):
        PackedDataset(packed["out"], tokenizer=tok)


KINDS = ["shard-00000.tok", "shard-00001.idx", "shard-00002.meta.arrow", "tokenizer/tokenizer.json"]


@pytest.mark.parametrize("name", KINDS + ["img"])
def test_verify_catches_a_flipped_byte_in_every_file_kind(damaged, name):
    if name == "img":
        name = next(p.name for p in damaged.glob("shard-*.img"))
    p = damaged / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2 + 3] ^= 0x01
    p.write_bytes(bytes(data))
    r = verify(damaged)
    assert not r.ok and [Path(f).name for f, _ in r.bad] == [p.name]
    result = CliRunner().invoke(main, ["verify", str(damaged)])
    assert result.exit_code == 1 and f"BAD {p}" in result.output


def test_verify_passes_a_good_pack(packed):
    r = verify(packed["out"])
    assert r.ok and r.checked == len(json.loads((packed["out"] / "dataset.json").read_text())["files"])
    result = CliRunner().invoke(main, ["verify", str(packed["out"])])
    assert result.exit_code == 0 and "match dataset.json" in result.output


@pytest.mark.parametrize("name", ["shard-00001.tok", "shard-00000.idx", "shard-00000.meta.arrow"])
def test_truncation_fails_on_open(damaged, name):
    p = damaged / name
    p.write_bytes(p.read_bytes()[:-8])
    with pytest.raises(FormatError, match=rf"{name}: \d+ bytes on disk, dataset.json expects \d+"):
        PackedDataset(damaged)


def test_truncated_file_with_matching_dataset_json_fails_on_its_header(damaged):
    p = damaged / "shard-00001.tok"
    p.write_bytes(p.read_bytes()[:-8])
    info = json.loads((damaged / "dataset.json").read_text())
    info["files"]["shard-00001.tok"]["bytes"] -= 8                # as if dataset.json were edited
    (damaged / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match=r"shard-00001.tok: \d+ bytes on disk, expected \d+ "
                                          r"\(\d+ tokens items\): the file is truncated"):
        PackedDataset(damaged)


def test_magic_and_version_mismatch_are_refused(damaged):
    p = damaged / "shard-00000.tok"
    data = bytearray(p.read_bytes())
    data[:8] = b"QVXIDX\0\0"
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"found the magic of a offsets file, expected "
                                          r"b'QVXTOK\\x00\\x00'"):
        PackedDataset(damaged)
    data[:8] = b"QVXTOK\0\0"
    data[8] = 2                                                  # major version 2
    p.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"format version 2.1, this reader supports major "
                                          r"version 1"):
        PackedDataset(damaged)


def test_missing_dataset_json_means_incomplete(damaged):
    (damaged / "dataset.json").unlink()
    with pytest.raises(FormatError, match="dataset.json: missing.*incomplete"):
        PackedDataset(damaged)
    with pytest.raises(FormatError, match="no such packed dataset folder"):
        PackedDataset(damaged / "nope")


def test_inspect_reports_counts_sources_skips_histogram_and_sample(packed, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(packed["out"]), "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)["dataset"]
    assert r["documents"] == 4012 and r["rows_with_images"] == 12
    ds = PackedDataset(packed["out"])
    assert r["rows_with_image_or_label"] == len(ds.multimodal_doc_indices) == 12
    assert [s["documents"] for s in r["sources"]] == [4000, 12]
    assert sum(h["documents"] for h in r["length_histogram"]) == 4012
    assert r["decision_counts"] == {n: int(sum(int(l) % 4 == c for l in packed["labels"]))
                                    for c, n in enumerate(["hold", "buy", "sell", "abstain"])}
    assert r["samples"][0]["text"].startswith(packed["verses"][0][:20])
    png = tmp_path / "sheet.png"
    result = CliRunner().invoke(main, ["inspect", str(packed["out"]), "--images", str(png)])
    assert result.exit_code == 0, result.output
    assert "document lengths" in result.stdout and "skipped: none" in result.stdout
    assert "sample #0" in result.stdout and png.stat().st_size > 1000


def test_inspect_reports_skipped_rows_by_reason_with_sample_lines(tmp_path, kjv_path,
                                                                    small_tokenizer):
    """KJV verses as JSONL rows with five bad rows between them, packed with on_error: skip:
    inspect (library and CLI, text and --json) counts the skips by reason and lists each row."""
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:40]
    bad = {5: "{not json", 12: json.dumps({"body": "no text field"}),
           20: json.dumps({"text": 42}), 27: json.dumps({"text": "   "}),
           33: json.dumps({"title": "still no text"})}           # 1-based line -> bad row
    lines, it = [], iter(verses)
    for n in range(1, len(verses) + len(bad) + 1):
        lines.append(bad[n] if n in bad else json.dumps({"text": next(it)}))
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = {"name": "skips", "tokenizer": str(small_tokenizer), "output": "out", "on_error": "skip",
         "sources": [{"path": "rows.jsonl"}]}
    (tmp_path / "pack.yaml").write_text(yaml.safe_dump(m))
    pack(tmp_path / "pack.yaml", workers=1, progress=False)
    want = {"empty": 1, "malformed_json": 1, "missing_field": 2, "non_string_text": 1}
    reasons = {5: "malformed_json", 12: "missing_field", 20: "non_string_text", 27: "empty",
               33: "missing_field"}

    r = inspect_dataset(tmp_path / "out")["dataset"]
    assert r["documents"] == len(verses) and r["skipped"] == want
    assert [(Path(s["path"]).name, s["row"], s["reason"]) for s in r["skipped_sample"]] == [
        ("rows.jsonl", n, reasons[n]) for n in sorted(bad)]
    assert all(s["message"] for s in r["skipped_sample"])

    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert ("skipped: empty 1, malformed_json 1, missing_field 2, non_string_text 1"
            in result.stdout)
    for n in sorted(bad):
        assert f"rows.jsonl row {n}: {reasons[n]}\n" in result.stdout, n
    assert "skipped: none" not in result.stdout
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dataset"]["skipped"] == want


def test_metadata_is_arrow_with_nulls_and_read_without_copy(packed):
    import pyarrow as pa

    ds = PackedDataset(packed["out"])
    last = len(ds.info["shards"]) - 1                 # the shard holding the 12 image rows
    path = packed["out"] / ds.info["shards"][last]["meta"]
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    n = ds.info["shards"][last]["num_documents"]
    assert table.num_rows == n and table.schema.metadata[b"qovaryx.format"] == b"qovaryx-meta"
    assert table.column("decision").null_count == n - 12 == table.column("image").null_count
    assert table.column("image").to_pylist()[-12:] == list(range(12))
    meta = ds._shard_meta(last)
    for name, col in meta.items():
        assert not col.flags.owndata and not col.flags.writeable, name   # views of the mapping
    assert meta["decision"][0] == -1 and meta["image"][-1] == 11


def test_document_starts_inside_windows_match_doc_offsets(packed):
    ds = PackedDataset(packed["out"])
    off = ds.doc_offsets
    boundary = ds.info["shards"][0]["num_tokens"]
    rng = np.random.default_rng(0)
    for start in [0, 1, boundary - 100, boundary, ds.num_tokens - 50,
                  *rng.integers(0, ds.num_tokens, 50)]:
        start = int(start)
        got = ds.document_starts(start, 2049)
        inside = off[(off >= start) & (off < start + 2049) & (off < ds.num_tokens)]
        assert got.tolist() == sorted(set((inside - start).tolist())), start


def test_inspect_images_on_a_dataset_without_images_is_a_clear_error(tmp_path, kjv_path,
                                                                       small_tokenizer):
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:50]
    (tmp_path / "kjv.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    m = {"name": "text", "tokenizer": str(small_tokenizer), "output": "out",
         "sources": [{"path": "kjv.txt", "split": "line"}]}
    (tmp_path / "pack.yaml").write_text(yaml.safe_dump(m))
    pack(tmp_path / "pack.yaml", workers=1, progress=False)
    png = tmp_path / "sheet.png"
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "out"), "--images", str(png)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)   # no traceback
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    assert "no row of this dataset has an image (50 rows, 0 with a decision label)" in result.stderr
    assert "leave the option out" in result.stderr and not png.exists()


def test_text_spans_of_text_rows_run_across_shards(packed):
    from qovaryx_data.collate import text_window

    ds = PackedDataset(packed["out"])
    n_text = len(packed["verses"])                       # 4000 verses over >= 3 shards, then images
    end = int(ds.doc_offsets[n_text])
    assert ds.text_spans.tolist() == [[0, end]]          # one run, whatever the shards
    boundary = ds.info["shards"][0]["num_tokens"]
    w = text_window(ds, boundary - 5, 10)               # across a shard boundary: fine (a copy)
    assert w.input_ids.tolist() == ds.window(boundary - 5, 10).tolist()
    assert text_window(ds, end - 10, 10).input_ids.tolist() == ds.window(end - 10, 10).tolist()
    with pytest.raises(ValueError, match=f"run of text-only rows holding token {end - 10} ends "
                                         f"at {end}"):
        text_window(ds, end - 10, 11)                    # one token into the first image row
