"""`qovaryx-data merge`: packed datasets of one tokenizer concatenated without re-tokenizing.

Real data: plays + KJV verses, Austen paragraphs, Fashion-MNIST rows with images and labels
(conftest's fallbacks without ../shared). Checks: every document of the result is the inputs'
document (tokens, source, row, image, label), data files are hard links, metadata is rewritten
only where its indices move, `verify` passes, re-runs are up to date, and every incompatibility is
refused naming both values.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fmnist import DECISION_NAMES, load_fashion_mnist, write_png_source
from qovaryx_data import PackedDataset, verify
from qovaryx_data.cli import main
from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.merge import merge


from trainer_util import pack_sources as _pack  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory, shakespeare_files, kjv_path, austen_path, fashion_mnist_dir,
          small_tokenizer):
    """a: 3 plays + 800 verses in shards of 40k tokens; b: 300 Austen paragraphs; c: 30
    Fashion-MNIST rows (image, caption, label) among 10 verses."""
    root = tmp_path_factory.mktemp("merge")
    src = root / "src"
    src.mkdir()
    for f in shakespeare_files[:3]:
        shutil.copyfile(f, src / f.name)
    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f) for _ in range(810)]
    (src / "kjv.txt").write_text("".join(verses[:800]), encoding="utf-8")
    paras = austen_path.read_text(encoding="utf-8").split("\n\n")
    (src / "austen.txt").write_text("\n\n".join(p for p in paras[:600] if p.strip())[:200_000],
                                    encoding="utf-8")
    images, labels = load_fashion_mnist(fashion_mnist_dir, 30)
    write_png_source(src, images, labels, text_only=[v.rstrip("\n") for v in verses[800:]])
    a = _pack(root / "a", small_tokenizer, [
        {"path": str(src / "*_gut.txt"), "format": "text", "split": "file"},
        {"path": str(src / "kjv.txt"), "format": "text", "split": "line"}], shard_tokens=40_000)
    b = _pack(root / "b", small_tokenizer, [
        {"path": str(src / "austen.txt"), "format": "text", "split": "paragraph"}])
    c = _pack(root / "c", small_tokenizer, [
        {"path": str(src / "rows.jsonl"), "format": "jsonl", "image_field": "image",
         "decision_field": "label", "decision_labels": DECISION_NAMES}],
        images={"size": [28, 28], "mode": "L"})
    c14 = _pack(root / "c14", small_tokenizer, [
        {"path": str(src / "rows.jsonl"), "format": "jsonl", "image_field": "image"}],
        images={"size": [14, 14], "mode": "L"})
    return {"a": a, "b": b, "c": c, "c14": c14, "root": root}


def _docs(ds: PackedDataset) -> list[tuple]:
    out = []
    for d in ds:
        out.append((d.tokens.tolist(), d.source, d.row, d.decision, d.decision_position,
                    None if d.image is None else d.image.tobytes()))
    return out


def test_merge_concatenates_documents_exactly(parts, tmp_path):
    ins = [parts["a"], parts["b"], parts["c"]]
    r = merge(ins, tmp_path / "abc")
    assert not r.up_to_date and r.inputs == 3
    out = PackedDataset(tmp_path / "abc")
    dss = [PackedDataset(p) for p in ins]
    assert _docs(out) == [x for ds in dss for x in _docs(ds)]
    assert len(out) == r.documents == sum(len(d) for d in dss)
    assert out.num_tokens == r.tokens == sum(d.num_tokens for d in dss)
    assert np.array_equal(out.window(0, out.num_tokens),
                          np.concatenate([d.window(0, d.num_tokens) for d in dss]))
    info = out.info
    assert [s["path"] for s in info["sources"]] == [s["path"] for d in dss for s in d.info["sources"]]
    assert info["images"]["shape"] == [28, 28, 1] and info["decision"]["labels"] == DECISION_NAMES
    assert info["num_images"] == 30 and info["num_multimodal_documents"] == 30
    assert len(info["shards"]) == r.shards == sum(len(d.info["shards"]) for d in dss)
    assert [m["fingerprint"] for m in info["merged_from"]] == [d.info["fingerprint"] for d in dss]
    assert verify(tmp_path / "abc").ok
    # the multimodal rows are still served whole, at their new indices
    base = len(dss[0]) + len(dss[1])
    assert out.multimodal_doc_indices.tolist() == (dss[2].multimodal_doc_indices + base).tolist()


def test_data_files_are_hard_links_and_meta_rewritten_only_where_indices_move(parts, tmp_path):
    r = merge([parts["a"], parts["b"]], tmp_path / "ab")
    a, out = PackedDataset(parts["a"]), PackedDataset(tmp_path / "ab")
    n_a = len(a.info["shards"])
    assert r.linked == 2 * r.shards + n_a and r.copied == 0     # .tok + .idx each, a's metas
    assert r.rewritten == r.shards - n_a
    for k, sh in enumerate(out.info["shards"]):
        src = (parts["a"] if k < n_a else parts["b"]) / "shard-{:05d}.tok".format(k if k < n_a else k - n_a)
        assert os.path.samefile(src, tmp_path / "ab" / sh["tokens"])
        same_meta = os.path.samefile(src.with_suffix(".meta.arrow"), tmp_path / "ab" / sh["meta"])
        assert same_meta == (k < n_a)
    assert {out[len(a)].source} == {PackedDataset(parts["b"])[0].source}


def test_rerun_is_up_to_date_and_order_changes_the_fingerprint(parts, tmp_path):
    first = merge([parts["a"], parts["b"]], tmp_path / "ab")
    fp = json.loads((tmp_path / "ab" / "dataset.json").read_text())["fingerprint"]
    again = merge([parts["a"], parts["b"]], tmp_path / "ab")
    assert again.up_to_date and again.documents == first.documents
    merge([parts["b"], parts["a"]], tmp_path / "ba")
    assert json.loads((tmp_path / "ba" / "dataset.json").read_text())["fingerprint"] != fp


def test_copy_mode_and_cross_file_system_fallback(parts, tmp_path, monkeypatch):
    r = merge([parts["a"], parts["b"]], tmp_path / "copy", link=False)
    assert r.linked == 0 and r.copied > 0
    assert not os.path.samefile(parts["a"] / "shard-00000.tok", tmp_path / "copy" / "shard-00000.tok")

    def exdev(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", exdev)
    r2 = merge([parts["a"], parts["b"]], tmp_path / "xdev")
    assert r2.linked == 0 and r2.copied == r.copied and verify(tmp_path / "xdev").ok
    assert _docs(PackedDataset(tmp_path / "xdev")) == _docs(PackedDataset(tmp_path / "copy"))


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "dataset.json").read_text())
    edit(info)
    (dst / "dataset.json").write_text(json.dumps(info))
    return dst


@pytest.mark.parametrize("what,edit,shown", [
    ("tokenizer hash", lambda i: i["tokenizer"].update(hash="f" * 64), "f" * 64),
    ("separator", lambda i: i.update(separator={"policy": "none", "eos_id": None}), "none"),
    ("image shape", None, "[14, 14, 1]"),   # a real pack at another size (the reader checks headers)
    ("decision labels", lambda i: i["decision"].update(labels=["a", "b", "c", "d"]),
     "['a', 'b', 'c', 'd']"),
])
def test_incompatible_inputs_are_refused_naming_both_values(parts, tmp_path, what, edit, shown):
    c = PackedDataset(parts["c"]).info
    other = parts["c14"] if edit is None else _edited(parts["c"], tmp_path / "other", edit)
    theirs = {"tokenizer hash": c["tokenizer"]["hash"], "separator": "eos",
              "image shape": "[28, 28, 1]", "decision labels": str(DECISION_NAMES)}[what]
    with pytest.raises(QovaryxDataError, match=what) as e:
        merge([parts["c"], other], tmp_path / "out")
    assert theirs in str(e.value) and shown in str(e.value) and str(other) in str(e.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_a_text_only_dataset_merges_with_a_multimodal_one(parts, tmp_path):
    merge([parts["b"], parts["c"]], tmp_path / "bc")
    info = PackedDataset(tmp_path / "bc").info
    assert info["images"]["shape"] == [28, 28, 1] and info["num_images"] == 30


def test_cli_merge_and_its_refusals(parts, tmp_path):
    res = CliRunner().invoke(main, ["merge", str(parts["a"]), str(parts["b"]),
                                    "--out", str(tmp_path / "ab")])
    assert res.exit_code == 0, res.output
    assert "merged 2 datasets" in res.output and "verify" not in res.output
    assert CliRunner().invoke(main, ["verify", str(tmp_path / "ab")]).exit_code == 0
    (tmp_path / "split" / "train").mkdir(parents=True)
    shutil.copy(parts["a"] / "dataset.json", tmp_path / "split" / "train" / "dataset.json")
    res = CliRunner().invoke(main, ["merge", str(parts["a"]), str(tmp_path / "split"),
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "merge" in res.output and "train" in res.output
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    res = CliRunner().invoke(main, ["merge", str(parts["a"]), "--out", str(tmp_path / "busy")])
    assert res.exit_code == 2 and "--force" in res.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_an_input_given_twice_is_refused(parts, tmp_path):
    res = CliRunner().invoke(main, ["merge", str(parts["a"]), str(parts["b"]),
                                    str(parts["a"]) + "/.", "--out", str(tmp_path / "aa")])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"{parts['a']} is given twice (inputs 1 and 3)" in res.output
    assert not (tmp_path / "aa").exists()
