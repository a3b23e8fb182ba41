"""Import and export: Megatron-LM (.bin + .idx), nanoGPT (train.bin/val.bin + meta.pkl) and llm.c
token shards, on real text (plays, KJV verses; conftest's fallbacks without ../shared).

Parity with the references: exported Megatron files are read by megatron-core's own
`IndexedDataset` and Megatron files written by its `IndexedDatasetBuilder` are imported; nanoGPT
and llm.c files are compared with streams built the way their prepare.py / fineweb.py scripts do
(end-of-text appended / prepended). Round trips are exact for `separator: eos` and `none`, uint16
and uint32 tokens, with a validation split; what a format cannot hold is refused.
"""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer, models, pre_tokenizers

from fmnist import load_fashion_mnist, write_png_source
from qovaryx_data import PackedDataset, tokenizer_hash, verify
from qovaryx_data.cli import main
from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.interop import ExportOptions, ImportOptions, export_dataset, import_dataset

N_VERSES = 600


from trainer_util import pack_sources as _pack  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory, shakespeare_files, kjv_path, fashion_mnist_dir, small_tokenizer):
    """Packed datasets of 2 plays + 600 verses (several shards): eos, none, with a validation
    split; 300 verses with a sparse word-level tokenizer (ids past 65,535: uint32); 12
    Fashion-MNIST rows with labels."""
    root = tmp_path_factory.mktemp("interop")
    src = root / "src"
    src.mkdir()
    for f in shakespeare_files[:2]:
        shutil.copyfile(f, src / f.name)
    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f).rstrip("\n") for _ in range(N_VERSES)]
    (src / "kjv.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    text = [{"path": str(src / "*_gut.txt"), "format": "text", "split": "file"},
            {"path": str(src / "kjv.txt"), "format": "text", "split": "line"}]
    eos = _pack(root / "eos", small_tokenizer, text, shard_tokens=30_000)
    none = _pack(root / "none", small_tokenizer, text, shard_tokens=30_000, separator="none")
    split = _pack(root / "split", small_tokenizer, text[1:], validation=0.2)
    words = sorted({w for v in verses[:300] for w in v.split()})
    wl = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<unk>": 1,
                                     **{w: 70_000 + i for i, w in enumerate(words)}},
                                    unk_token="<unk>"))
    wl.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wl.add_special_tokens(["<|endoftext|>"])
    (root / "wl").mkdir()
    wl.save(str(root / "wl" / "tokenizer.json"))
    (src / "kjv300.txt").write_text("\n".join(verses[:300]) + "\n", encoding="utf-8")
    u32 = _pack(root / "u32", root / "wl", [{"path": str(src / "kjv300.txt"), "split": "line"}])
    images, labels = load_fashion_mnist(fashion_mnist_dir, 12)
    write_png_source(src / "mm", images, labels)
    mm = _pack(root / "mm", small_tokenizer, [{"path": str(src / "mm" / "rows.jsonl"),
                                               "image_field": "image", "decision_field": "label"}],
               images={"size": [28, 28], "mode": "L"})
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    return {"eos": eos, "none": none, "split": split, "u32": u32, "mm": mm, "verses": verses,
            "plays": [src / f.name for f in shakespeare_files[:2]], "tok": tok,
            "tok_dir": small_tokenizer, "wl_dir": root / "wl"}


def megatron_core():
    """megatron-core's indexed_dataset module (the dev extra); CI must have it, elsewhere skip."""
    if os.environ.get("CI"):
        import megatron.core.datasets.indexed_dataset as m
        return m
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


def docs_of(path: Path) -> list[list[int]]:
    return [d.tokens.tolist() for d in PackedDataset(path)]


def assert_same_dataset(a: Path, b: Path) -> None:
    da, db = PackedDataset(a), PackedDataset(b)
    assert docs_of(a) == docs_of(b)
    assert da.dtype == db.dtype and da.info["separator"] == db.info["separator"]
    assert da.info["tokenizer"]["hash"] == db.info["tokenizer"]["hash"]
    assert verify(b).ok


def reference_stream(data, where: str) -> list[int]:
    """The token stream nanoGPT's prepare.py (eot appended) or llm.c's fineweb.py (eot prepended)
    builds from the same documents (plays, then verses), encoded like the packer."""
    tok, eot = data["tok"], data["tok"].token_to_id("<|endoftext|>")
    out: list[int] = []
    texts = [p.read_text(encoding="utf-8") for p in sorted(data["plays"])] + data["verses"]
    for e in tok.encode_batch(texts, add_special_tokens=False):
        out.extend(e.ids + [eot] if where == "after" else [eot] + e.ids)
    return out


# ---------------------------------------------------------------- megatron

@pytest.mark.parametrize("kind", ["eos", "none", "u32"])
def test_megatron_export_reads_back_in_megatron_core_and_round_trips(data, tmp_path, kind):
    idx_mod = megatron_core()
    r = export_dataset(data[kind], to="megatron", out=tmp_path / "m" / "x_text_document")
    assert [p.name for p in r.files] == ["x_text_document.bin", "x_text_document.idx"]
    md = idx_mod.IndexedDataset(str(tmp_path / "m" / "x_text_document"))
    ours = docs_of(data[kind])
    assert len(md) == len(ours) and md.document_indices.tolist() == list(range(len(ours) + 1))
    assert md.index.dtype == (np.int32 if kind == "u32" else np.uint16)
    assert all(md[i].tolist() == d for i, d in enumerate(ours))
    tok = data["wl_dir"] if kind == "u32" else data["tok_dir"]
    res = import_dataset("megatron", tmp_path / "m" / "x_text_document.idx", tokenizer=tok,
                         out=tmp_path / "back")
    assert res.separator == ("none" if kind == "none" else "eos")
    assert_same_dataset(data[kind], tmp_path / "back")


def test_megatron_import_of_files_built_by_megatron_core(data, tmp_path):
    """Files written by megatron-core's IndexedDatasetBuilder, some documents in two sequences
    (as preprocess_data.py --split-sentences writes): a document is its sequences joined."""
    torch = pytest.importorskip("torch")
    idx_mod = megatron_core()
    ours = docs_of(data["eos"])
    prefix = str(tmp_path / "ref")
    b = idx_mod.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for i, d in enumerate(ours):
        cut = len(d) // 2 if i % 3 == 0 else len(d)
        b.add_item(torch.tensor(d[:cut]))
        if cut < len(d):
            b.add_item(torch.tensor(d[cut:]))
        b.end_document()
    b.finalize(prefix + ".idx")
    import_dataset("megatron", Path(prefix), tokenizer=data["tok_dir"], out=tmp_path / "imp")
    ds = PackedDataset(tmp_path / "imp")
    assert docs_of(tmp_path / "imp") == ours and ds.info["separator"]["policy"] == "eos"
    assert ds.info["tokenizer"]["hash"] == tokenizer_hash(data["tok_dir"])
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "ref.bin").read_bytes())
    (tmp_path / "trunc.idx").write_bytes((tmp_path / "ref.idx").read_bytes()[:-8])
    with pytest.raises(QovaryxDataError, match="truncated or damaged"):
        import_dataset("megatron", tmp_path / "trunc", tokenizer=data["tok_dir"], out=tmp_path / "t")


def test_megatron_separator_none_and_eos_refusal(data, tmp_path):
    export_dataset(data["none"], to="megatron", out=tmp_path / "n")
    with pytest.raises(QovaryxDataError, match="document 0 does not end with the end-of-text id 0"):
        import_dataset("megatron", tmp_path / "n", tokenizer=data["tok_dir"], out=tmp_path / "x",
                       options=ImportOptions(separator="eos"))


# ---------------------------------------------------------------- nanogpt

def test_nanogpt_export_is_what_prepare_py_writes_and_round_trips(data, tmp_path):
    r = export_dataset(data["eos"], to="nanogpt", out=tmp_path / "ng")
    assert sorted(p.name for p in r.files) == ["meta.pkl", "train.bin"]
    stream = np.memmap(tmp_path / "ng" / "train.bin", dtype=np.uint16, mode="r")   # train.py's read
    assert stream.tolist() == reference_stream(data, "after")
    meta = pickle.loads((tmp_path / "ng" / "meta.pkl").read_bytes())
    assert meta["vocab_size"] == PackedDataset(data["eos"]).info["tokenizer"]["max_id"] + 1
    import_dataset("nanogpt", tmp_path / "ng", tokenizer=data["tok_dir"], out=tmp_path / "back")
    assert_same_dataset(data["eos"], tmp_path / "back")


def test_nanogpt_separator_none_needs_add_eos_then_round_trips(data, tmp_path):
    with pytest.raises(QovaryxDataError, match="no document index.*--add-eos"):
        export_dataset(data["none"], to="nanogpt", out=tmp_path / "ng")
    export_dataset(data["none"], to="nanogpt", out=tmp_path / "ng",
                   options=ExportOptions(add_eos=True))
    assert np.fromfile(tmp_path / "ng" / "train.bin", "<u2").tolist() == reference_stream(data, "after")
    import_dataset("nanogpt", tmp_path / "ng" / "train.bin", tokenizer=data["tok_dir"],
                   out=tmp_path / "back", options=ImportOptions(separator="none"))
    assert_same_dataset(data["none"], tmp_path / "back")


def test_nanogpt_train_and_val_splits_and_uint32_refusal(data, tmp_path):
    r = export_dataset(data["split"], to="nanogpt", out=tmp_path / "ng")
    assert sorted(p.name for p in r.files) == ["meta.pkl", "train.bin", "val.bin"]
    res = import_dataset("nanogpt", tmp_path / "ng", tokenizer=data["tok_dir"], out=tmp_path / "b")
    assert set(res.datasets) == {"train", "val"}
    for s in ("train", "val"):
        assert_same_dataset(data["split"] / s, tmp_path / "b" / s)
        assert PackedDataset(tmp_path / "b" / s).info["split"] == s
    r = export_dataset(data["split"], to="megatron", out=tmp_path / "m" / "kjv")
    assert sorted(p.name for p in r.files) == ["kjv_train.bin", "kjv_train.idx", "kjv_val.bin",
                                               "kjv_val.idx"]
    r = export_dataset(data["split"] / "val", to="megatron", out=tmp_path / "m" / "one")
    assert [p.name for p in r.files] == ["one.bin", "one.idx"]
    import_dataset("megatron", tmp_path / "m" / "kjv_val", tokenizer=data["tok_dir"], out=tmp_path / "v")
    assert docs_of(tmp_path / "v") == docs_of(data["split"] / "val")
    with pytest.raises(QovaryxDataError, match="reads uint16 only"):
        export_dataset(data["u32"], to="nanogpt", out=tmp_path / "u")


# ---------------------------------------------------------------- llm.c

def test_llmc_export_is_what_fineweb_py_writes_and_round_trips(data, tmp_path):
    r = export_dataset(data["eos"], to="llmc", out=tmp_path / "lc",
                       options=ExportOptions(shard_tokens=50_000, name="shk"))
    names = [p.name for p in r.files]
    assert names[0] == "shk_train_000000.bin" and len(names) > 1     # documents span shards
    stream = []
    for p in r.files:
        header = np.fromfile(p, "<i4", 256)
        assert header[:2].tolist() == [20240520, 1] and not header[3:].any()
        toks = np.fromfile(p, "<u2", offset=1024)
        assert header[2] == len(toks) <= 50_000
        stream.extend(toks.tolist())
    assert stream == reference_stream(data, "before")
    import_dataset("llmc", tmp_path / "lc", tokenizer=data["tok_dir"], out=tmp_path / "back")
    assert_same_dataset(data["eos"], tmp_path / "back")
    import_dataset("llmc", tmp_path / "lc" / "shk_train_*.bin", tokenizer=data["tok_dir"],
                   out=tmp_path / "glob")
    assert docs_of(tmp_path / "glob") == docs_of(data["eos"])


@pytest.mark.parametrize("kind", ["none", "u32", "split"])
def test_llmc_round_trips(data, tmp_path, kind):
    r = export_dataset(data[kind], to="llmc", out=tmp_path / "lc")
    if kind == "u32":
        assert np.fromfile(r.files[0], "<i4", 2).tolist() == [20240801, 7]
    tok = data["wl_dir"] if kind == "u32" else data["tok_dir"]
    opts = ImportOptions(separator="none" if kind == "none" else "auto")
    res = import_dataset("llmc", tmp_path / "lc", tokenizer=tok, out=tmp_path / "back", options=opts)
    if kind == "split":
        for s in ("train", "val"):
            assert_same_dataset(data[kind] / s, tmp_path / "back" / s)
    else:
        assert_same_dataset(data[kind], tmp_path / "back")
        assert res.documents == len(PackedDataset(data[kind]))


# ---------------------------------------------------------------- refusals and the CLI

def test_a_tokenizer_too_small_for_the_ids_is_refused(data, tmp_path):
    export_dataset(data["u32"], to="llmc", out=tmp_path / "lc")
    with pytest.raises(QovaryxDataError, match=r"token id 7\d{4}, but the tokenizer .* holds ids "
                                               r"0\.\.2047 only"):
        import_dataset("llmc", tmp_path / "lc", tokenizer=data["tok_dir"], out=tmp_path / "x")
    assert not (tmp_path / "x" / "dataset.json").exists()


def test_bad_headers_are_refused(data, tmp_path):
    r = export_dataset(data["eos"], to="llmc", out=tmp_path / "lc")
    raw = bytearray(r.files[0].read_bytes())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.bin").write_bytes(b"\x01\x02\x03\x04" + bytes(raw[4:]))
    with pytest.raises(QovaryxDataError, match="magic 67305985, expected llm.c's 20240520"):
        import_dataset("llmc", tmp_path / "bad" / "a.bin", tokenizer=data["tok_dir"], out=tmp_path / "x")
    (tmp_path / "bad" / "a.bin").write_bytes(bytes(raw[:-2]))
    with pytest.raises(QovaryxDataError, match="truncated"):
        import_dataset("llmc", tmp_path / "bad" / "a.bin", tokenizer=data["tok_dir"], out=tmp_path / "x")
    (tmp_path / "odd.bin").write_bytes(b"\0\0\0")
    with pytest.raises(QovaryxDataError, match="odd number"):
        import_dataset("nanogpt", tmp_path / "odd.bin", tokenizer=data["tok_dir"], out=tmp_path / "x")


@pytest.mark.parametrize("to", ["megatron", "nanogpt", "llmc"])
def test_images_and_labels_are_refused_unless_dropped(data, tmp_path, to):
    with pytest.raises(QovaryxDataError, match="12 rows have an image.*--drop-images"):
        export_dataset(data["mm"], to=to, out=tmp_path / "o")
    with pytest.raises(QovaryxDataError, match="12 rows have a decision label.*--drop-labels"):
        export_dataset(data["mm"], to=to, out=tmp_path / "o", options=ExportOptions(drop_images=True))
    export_dataset(data["mm"], to=to, out=tmp_path / "o" / "x",
                   options=ExportOptions(drop_images=True, drop_labels=True))
    src = tmp_path / "o" / "x" if to != "megatron" else tmp_path / "o" / "x.idx"
    import_dataset(to, src, tokenizer=data["tok_dir"], out=tmp_path / "back")
    assert docs_of(tmp_path / "back") == docs_of(data["mm"])


def test_cli_export_import_and_up_to_date(data, tmp_path):
    run = CliRunner().invoke
    res = run(main, ["export", str(data["eos"]), "--to", "llmc", "--out", str(tmp_path / "lc")])
    assert res.exit_code == 0, res.output
    assert "exported" in res.output and "_train_000000.bin" in res.output
    args = ["import", "--from", "llmc", str(tmp_path / "lc"), "--tokenizer", str(data["tok_dir"]),
            "--out", str(tmp_path / "back")]
    res = run(main, args)
    assert res.exit_code == 0 and "separator eos" in res.output, res.output
    assert "up to date" in run(main, args).output
    res = run(main, ["export", str(data["mm"]), "--to", "nanogpt", "--out", str(tmp_path / "ng")])
    assert res.exit_code == 2 and "--drop-images" in res.output and "Traceback" not in res.output
    res = run(main, ["export", str(data["eos"]), "--to", "llmc", "--out", str(tmp_path / "x"),
                     "--shard-tokens", str(2**31)])
    assert res.exit_code == 2 and "2147483647" in res.output


# ---------------------------------------------------------------- re-exports, damage, bad options

def test_llmc_re_export_replaces_the_earlier_shards_and_a_failed_one_leaves_them(data, tmp_path,
                                                                                 monkeypatch):
    from qovaryx_data.interop import llmc

    out = tmp_path / "lc"
    first = export_dataset(data["eos"], to="llmc", out=out, options=ExportOptions(shard_tokens=20_000))
    second = export_dataset(data["eos"], to="llmc", out=out,
                            options=ExportOptions(shard_tokens=1_000_000))
    assert len(first.files) > len(second.files) == 1
    assert sorted(out.iterdir()) == second.files          # no stale shard read as more data
    import_dataset("llmc", out, tokenizer=data["tok_dir"], out=tmp_path / "back")
    assert docs_of(tmp_path / "back") == docs_of(data["eos"])

    def stopped(ds, *a, **k):          # a run stopped after some shards were complete
        it = stream_batches(ds, max_tokens=30_000)
        yield next(it)
        raise KeyboardInterrupt

    stream_batches = llmc.doc_batches
    monkeypatch.setattr(llmc, "doc_batches", stopped)
    with pytest.raises(KeyboardInterrupt):
        export_dataset(data["eos"], to="llmc", out=out, options=ExportOptions(shard_tokens=5_000))
    assert sorted(out.iterdir()) == second.files          # the earlier export, whole; no temps


def test_megatron_damaged_pointers_and_an_export_stopped_between_renames(data, tmp_path,
                                                                         monkeypatch):
    from qovaryx_data.interop import megatron

    export_dataset(data["eos"], to="megatron", out=tmp_path / "x")
    idx = bytearray((tmp_path / "x.idx").read_bytes())
    n_seq = int(np.frombuffer(bytes(idx[18:26]), "<u8")[0])
    ptr_at = 34 + 4 * n_seq + 8 * 5                        # sequence 5's pointer
    idx[ptr_at:ptr_at + 8] = np.array([10**9], "<i8").tobytes()
    (tmp_path / "d.idx").write_bytes(bytes(idx))
    shutil.copyfile(tmp_path / "x.bin", tmp_path / "d.bin")
    with pytest.raises(QovaryxDataError, match=r"d\.idx: sequence 5 .* at byte 1000000000, "
                                               r"outside .*d\.bin"):
        import_dataset("megatron", tmp_path / "d", tokenizer=data["tok_dir"], out=tmp_path / "o")

    real = os.replace

    def second_fails(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(megatron.os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt):                 # the old x.idx no longer indexes x.bin
        export_dataset(data["none"], to="megatron", out=tmp_path / "x")
    assert not (tmp_path / "x.idx").exists() and not list(tmp_path.glob(".x.*"))


def test_bad_eos_id_and_an_out_that_is_a_file_are_refused_at_the_cli(data, tmp_path):
    run = CliRunner().invoke
    export_dataset(data["eos"], to="nanogpt", out=tmp_path / "ng")
    res = run(main, ["import", "--from", "nanogpt", str(tmp_path / "ng"), "--tokenizer",
                     str(data["tok_dir"]), "--out", str(tmp_path / "o"), "--eos-id", "5000"])
    assert res.exit_code == 2 and "--eos-id 5000" in res.output and "0..2047" in res.output
    (tmp_path / "file").write_text("x")
    for to in ("nanogpt", "llmc"):
        res = run(main, ["export", str(data["eos"]), "--to", to, "--out", str(tmp_path / "file")])
        assert res.exit_code == 2 and "give a folder" in res.output, res.output
        assert "Traceback" not in res.output
