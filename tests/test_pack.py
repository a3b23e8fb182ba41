"""`qovaryx-data pack` on real text (../shared corpora): round trip, worker-count independence,
shard rolling, validation split, idempotence, the lock, the dtype rule, progress, every bad input.

The kill-and-resume test lives in test_pack_resume.py.
"""
from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from tokenizers import Tokenizer

from qovaryx_data import PackedDataset, SourceError, tokenizer_hash
from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.cli import main
from qovaryx_data.packer import PackLockedError, pack

N_PLAYS = 8
KJV_LINES = 6000
SHARD_TOKENS = 150_000


def write_manifest(folder: Path, tokenizer: Path, sources: list[dict], **extra) -> Path:
    m = {"name": "test", "tokenizer": str(tokenizer), "output": "out", "sources": sources, **extra}
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "pack.yaml"
    p.write_text(yaml.safe_dump(m, sort_keys=False), encoding="utf-8")
    return p


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a packed dataset (relative path -> bytes), the lock excluded."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pack.lock"}


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, shakespeare_files, kjv_path, small_tokenizer):
    """8 plays (one document each) + 6,000 KJV verses (one per line, 4 work units), packed with
    2 workers into shards of 150k tokens."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    plays = []
    for f in shakespeare_files[:N_PLAYS]:
        (src / f.name).write_bytes(f.read_bytes())
        plays.append(src / f.name)
    with open(kjv_path, encoding="utf-8") as f:
        verses = [next(f).rstrip("\n") for _ in range(KJV_LINES)]
    (src / "kjv.txt").write_text("\n".join(verses) + "\n", encoding="utf-8")
    sources = [{"path": "src/*_gut.txt", "format": "text", "split": "file"},
               {"path": "src/kjv.txt", "format": "text", "split": "line"}]
    manifest = write_manifest(root, small_tokenizer, sources, shard_tokens=SHARD_TOKENS,
                              unit_bytes=64 * 1024)
    result = pack(manifest, workers=2, progress=False)
    return {"root": root, "manifest": manifest, "result": result, "out": root / "out",
            "plays": plays, "verses": verses, "tok": small_tokenizer}


def test_round_trip_decodes_to_the_source_documents(text_corpus):
    c = text_corpus
    ds = PackedDataset(c["out"])
    tok = Tokenizer.from_file(str(c["tok"] / "tokenizer.json"))
    assert len(ds) == N_PLAYS + KJV_LINES
    for i, play in enumerate(c["plays"]):
        doc = ds[i]
        assert doc.tokens[-1] == 0                                # <|endoftext|> separator
        assert tok.decode(doc.tokens[:-1].tolist(), skip_special_tokens=False) == play.read_text()
        assert (doc.source, doc.row) == (str(play.resolve()), 1)
    docs = [ds[N_PLAYS + j] for j in range(KJV_LINES)]
    # parity with the reference library: the same ids as Tokenizer.encode_batch, plus the separator
    ref = tok.encode_batch(c["verses"], add_special_tokens=False)
    assert all(d.tokens.tolist() == r.ids + [0] for d, r in zip(docs, ref))
    assert [tok.decode(d.tokens[:-1].tolist()) for d in docs[:500]] == c["verses"][:500]
    assert [d.row for d in docs[:3]] == [1, 2, 3] and docs[-1].row == KJV_LINES
    assert ds.num_tokens == sum(len(d.tokens) for d in ds)


def test_dataset_json_records_tokenizer_dtype_counts_and_checksums(text_corpus):
    c = text_corpus
    info = json.loads((c["out"] / "dataset.json").read_text())
    assert info["format"] == "qovaryx-packed" and info["format_version"] == "1.1"
    assert info["tokenizer"]["hash"] == tokenizer_hash(c["tok"])
    assert info["tokenizer"]["vocab_size"] == 2048
    assert info["tokenizer"]["special_tokens"]["<|endoftext|>"] == 0
    assert info["dtype"] == "uint16"
    assert tokenizer_hash(c["out"] / "tokenizer") == info["tokenizer"]["hash"]   # the copy
    assert [s["documents"] for s in info["sources"]] == [N_PLAYS, KJV_LINES]
    assert sum(s["tokens"] for s in info["sources"]) == info["num_tokens"]
    assert info["skipped"] == {}
    listed = set(info["files"])
    on_disk = {k for k in files_of(c["out"]) if k != "dataset.json"}
    assert listed == on_disk                   # every file is checksummed; no stray temp files
    assert all(len(f["xxh3_128"]) == 32 for f in info["files"].values())
    assert c["result"].documents == info["num_documents"] and not c["result"].up_to_date


def test_shards_roll_past_shard_tokens_and_documents_never_span(text_corpus):
    ds = PackedDataset(text_corpus["out"])
    shards = ds.info["shards"]
    lengths = np.diff(ds.doc_offsets)
    expected, held = 1, 0                     # the shard count this corpus gives: roll once full
    for n in lengths:
        if held >= SHARD_TOKENS:
            expected, held = expected + 1, 0
        held += n
    assert len(shards) == expected >= 3
    first = 0
    for sh in shards[:-1]:
        n = sh["num_documents"]
        assert sh["num_tokens"] >= SHARD_TOKENS                         # rolled only once full
        assert sh["num_tokens"] - lengths[first + n - 1] < SHARD_TOKENS  # ... by its last document
        first += n
    assert sum(s["num_documents"] for s in shards) == len(ds)


def test_output_is_byte_identical_for_any_worker_count(text_corpus, tmp_path):
    ref = files_of(text_corpus["out"])
    r = pack(text_corpus["manifest"], out=tmp_path / "w1", workers=1, progress=False)
    assert r.units == r.units_done > 8
    assert files_of(tmp_path / "w1") == ref


def test_rerun_with_unchanged_inputs_does_nothing(text_corpus):
    out = text_corpus["out"]
    def stamps():
        return {p: p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and p.name != ".pack.lock"}

    before = stamps()
    result = CliRunner().invoke(main, ["pack", "--manifest", str(text_corpus["manifest"])])
    assert result.exit_code == 0, result.output
    assert "up to date, nothing to do" in result.output
    assert stamps() == before


def test_changed_source_repacks(small_tokenizer, kjv_path, tmp_path):
    src = tmp_path / "v.txt"
    src.write_text("In the beginning.\nAnd the earth was without form.\n")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    assert not pack(m, workers=1, progress=False).up_to_date
    assert pack(m, workers=1, progress=False).up_to_date
    src.write_text("In the beginning.\n")
    r = pack(m, workers=1, progress=False)
    assert not r.up_to_date and r.documents == 1 == len(PackedDataset(tmp_path / "out"))


def test_progress_bar_shows_documents_tokens_and_rate(small_tokenizer, kjv_path, tmp_path):
    (tmp_path / "v.txt").write_text(kjv_path.read_text()[:20000])
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    result = CliRunner().invoke(main, ["pack", "--manifest", str(m), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "docs=" in result.stderr and "tokens=" in result.stderr and "tok/s=" in result.stderr
    assert "packed" in result.stdout and "tokens/s" in result.stdout


def test_concurrent_pack_into_the_same_output_is_refused(small_tokenizer, tmp_path):
    (tmp_path / "v.txt").write_text("one line\n")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / ".pack.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)          # what a running pack holds
        with pytest.raises(PackLockedError, match="another `qovaryx-data pack` is writing"):
            pack(m, workers=1, progress=False)
        result = CliRunner().invoke(main, ["pack", "--manifest", str(m)])
        assert result.exit_code == 2 and "another `qovaryx-data pack`" in result.output
    assert pack(m, workers=1, progress=False).documents == 1   # released: packs fine


def test_validation_split_is_a_stable_content_hash(small_tokenizer, kjv_path, tmp_path):
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:3000]
    (tmp_path / "a.txt").write_text("\n".join(verses) + "\n")
    (tmp_path / "b.txt").write_text("\n".join(verses[1000:]) + "\n")   # a different corpus
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))

    def sides(name):
        folder = tmp_path / name
        m = write_manifest(folder, small_tokenizer, [{"path": f"../{name}.txt", "split": "line"}],
                           validation=0.2)
        r = pack(m, workers=2, progress=False)
        assert set(r.datasets) == {"train", "val"}
        out = {}
        for split in ("train", "val"):
            ds = PackedDataset(folder / "out" / split)
            assert ds.info["split"] == split
            for d in ds:
                out[tok.decode(d.tokens[:-1].tolist())] = split
        return out

    a, b = sides("a"), sides("b")
    assert len(a) == len(set(verses))                                # nothing lost
    share = sum(v == "val" for v in a.values()) / len(a)
    assert 0.15 < share < 0.25
    assert all(a[t] == b[t] for t in b)                              # same document, same side
    with pytest.raises(Exception, match="open .*/train or .*/val"):
        PackedDataset(tmp_path / "a" / "out")


def word_level_tokenizer(folder: Path, vocab: dict[str, int]) -> Path:
    """A whitespace WordLevel tokenizer with the given ids (<|endoftext|> and <unk> included)."""
    from tokenizers import models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_dtype_is_uint32_when_ids_exceed_uint16(tmp_path):
    """A word-level tokenizer with 70,000 entries: ids reach past 65,535, so tokens are uint32."""
    words = [f"w{i}" for i in range(70_000)]
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    (tmp_path / "t.txt").write_text("w1 w65600 w69999\nw0 w65534\n")
    m = write_manifest(tmp_path, word_level_tokenizer(tmp_path / "tok", vocab),
                       [{"path": "t.txt", "split": "line"}])
    pack(m, workers=1, progress=False)
    ds = PackedDataset(tmp_path / "out")
    assert ds.info["dtype"] == "uint32" and ds[0].tokens.dtype == np.uint32
    assert ds[0].tokens.tolist() == [3, 65602, 70001, 0]
    assert ds[1].tokens.tolist() == [2, 65536, 0]


def test_dtype_follows_the_largest_id_not_the_vocabulary_count(tmp_path):
    """Sparse ids: a 4-entry WordLevel vocabulary with id 70,000 among them needs uint32 (the
    count, 4, would say uint16 and overflow in a worker). DESIGN §2: the largest id possible."""
    tok = word_level_tokenizer(tmp_path / "tok", {"<|endoftext|>": 0, "<unk>": 1, "low": 2,
                                                  "high": 70_000})
    assert Tokenizer.from_file(str(tok / "tokenizer.json")).get_vocab_size() == 4
    (tmp_path / "t.txt").write_text("low high\nhigh\n")
    m = write_manifest(tmp_path, tok, [{"path": "t.txt", "split": "line"}])
    pack(m, workers=2, progress=False)
    ds = PackedDataset(tmp_path / "out")
    assert ds.info["dtype"] == "uint32" and ds.info["tokenizer"]["max_id"] == 70_000
    assert [ds[i].tokens.tolist() for i in range(2)] == [[2, 70_000, 0], [70_000, 0]]


def test_tokenizer_from_a_model_folder_copies_only_the_tokenizer_files(small_tokenizer, tmp_path):
    """`tokenizer:` may name a model folder (weights, config, tokenizer files side by side):
    each dataset gets a copy of the tokenizer's files only, never the weights."""
    model = tmp_path / "model"
    model.mkdir()
    for p in small_tokenizer.iterdir():
        (model / p.name).write_bytes(p.read_bytes())
    (model / "model.safetensors").write_bytes(b"\0" * 4096)
    (model / "config.json").write_text('{"model_type": "qovaryx"}')
    (model / "generation_config.json").write_text("{}")
    (tmp_path / "t.txt").write_text("a line\nanother line\n")
    m = write_manifest(tmp_path, model, [{"path": "t.txt", "split": "line"}], validation=0.5)
    pack(m, workers=1, progress=False)
    for split in ("train", "val"):
        copied = sorted(p.name for p in (tmp_path / "out" / split / "tokenizer").iterdir())
        assert copied == sorted(p.name for p in small_tokenizer.iterdir())
        info = json.loads((tmp_path / "out" / split / "dataset.json").read_text())
        assert sorted(f for f in info["files"] if f.startswith("tokenizer/")) == [
            f"tokenizer/{n}" for n in copied]


def _empty_inputs(tmp_path: Path) -> dict[str, dict]:
    """Sources that yield no document: an empty text file, a file of blank lines, an empty
    .jsonl.zst and a zero-row parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n\n")
    (tmp_path / "empty.jsonl.zst").write_bytes(_zst(b""))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    return {"empty.txt": {"split": "file"}, "blank.txt": {"split": "line"},
            "empty.jsonl.zst": {}, "zero.parquet": {}}


def test_a_source_without_documents_is_an_error_unless_it_allows_it(small_tokenizer, tmp_path):
    empties = _empty_inputs(tmp_path)
    (tmp_path / "good.txt").write_text("one verse\nanother verse\n")
    good = {"path": "good.txt", "split": "line"}
    for name, opts in empties.items():
        m = write_manifest(tmp_path, small_tokenizer, [good, {"path": name, **opts}])
        with pytest.raises(SourceError, match=rf"sources\[1\] \(.*{re.escape(name)}\): the source "
                                              rf"yields no documents.*allow_empty: true") as e:
            pack(m, workers=1, progress=False)
        assert e.value.reason == "empty_source"
        assert not (tmp_path / "out" / "dataset.json").exists()
    allowed = [{"path": n, **o, "allow_empty": True} for n, o in empties.items()]
    r = pack(write_manifest(tmp_path, small_tokenizer, [good, *allowed]), workers=2,
             progress=False)
    assert r.documents == 2
    assert [s["documents"] for s in PackedDataset(tmp_path / "out").info["sources"]] == [2, 0, 0,
                                                                                         0, 0]
    # a whole pack of no documents: an error unless every source allows it
    m = write_manifest(tmp_path, small_tokenizer, [allowed[0], {"path": "blank.txt",
                                                                "split": "line"}])
    with pytest.raises(SourceError, match=r"sources\[1\].*no documents \(rows skipped: 4 empty\)"):
        pack(m, workers=1, progress=False)
    m = write_manifest(tmp_path, small_tokenizer, allowed)
    assert pack(m, workers=1, progress=False).documents == 0


# ---------------------------------------------------------------------------- bad input

def _zst(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def _parquet(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a document", "another"]}), path)


# name -> (file name, bytes, source options, reason, row)
BAD = {
    "malformed_json": ("x.jsonl", b'{"text": "fine"}\n{"text": "unterminated\n', {}, 2),
    "missing_field": ("x.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n', {}, 2),
    "non_string_text": ("x.jsonl", b'{"text": "fine"}\n{"text": 17}\n', {}, 2),
    "invalid_utf8": ("x.txt", b"fine line\nbad \xff\xfe line\n", {"split": "line"}, 2),
    "corrupt_zst": ("x.jsonl.zst", None, {}, None),
}


def _bad_source(tmp_path: Path, reason: str) -> tuple[str, dict]:
    name, data, opts, _ = BAD[reason]
    if reason == "corrupt_zst":
        good = _zst(b"".join(b'{"text": "row %d"}\n' % i for i in range(2000)))
        data = good[: len(good) // 2]                                   # truncated
    (tmp_path / name).write_bytes(data)
    return name, opts


@pytest.mark.parametrize("reason", list(BAD))
def test_bad_row_fails_naming_file_and_row(reason, small_tokenizer, tmp_path):
    name, opts = _bad_source(tmp_path, reason)
    # three copies: the error crosses the worker pool (pickled) and still names file and row
    for i in range(3):
        (tmp_path / f"{i}{name}").write_bytes((tmp_path / name).read_bytes())
    (tmp_path / name).unlink()
    m = write_manifest(tmp_path, small_tokenizer, [{"path": f"*{name}", **opts}])
    with pytest.raises(SourceError) as e:
        pack(m, workers=2, progress=False)
    assert e.value.reason == reason
    assert e.value.path == str((tmp_path / f"0{name}").resolve())
    if BAD[reason][3] is not None:
        assert e.value.row == BAD[reason][3] and str(BAD[reason][3]) in str(e.value)
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_unreadable_zst_and_missing_parquet_column_and_empty_glob(small_tokenizer, tmp_path):
    (tmp_path / "g.jsonl.zst").write_bytes(b"this is not zstd at all\n" * 10)
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "g.jsonl.zst"}])
    with pytest.raises(SourceError, match="g.jsonl.zst") as e:
        pack(m, workers=1, progress=False)
    assert e.value.reason == "corrupt_zst"
    _parquet(tmp_path / "p.parquet")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "p.parquet"}])
    with pytest.raises(SourceError, match=r"p.parquet: no column 'text'") as e:
        pack(m, workers=1, progress=False)
    assert e.value.reason == "missing_column"
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "nothing/*.txt"}])
    with pytest.raises(SourceError, match="matches nothing") as e:
        pack(m, workers=1, progress=False)
    assert e.value.reason == "no_match"


def test_skip_counts_every_bad_row_by_reason(small_tokenizer, tmp_path):
    sources = []
    for reason in ("malformed_json", "missing_field", "non_string_text", "invalid_utf8",
                   "corrupt_zst"):
        sub = tmp_path / reason
        sub.mkdir()
        name, opts = _bad_source(sub, reason)
        # the truncated zst yields no document at all: an empty source must say it may be empty
        sources.append({"path": f"{reason}/{name}", **opts,
                        **({"allow_empty": True} if reason == "corrupt_zst" else {})})
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"text": "   "}\n{"text": "kept"}\n\n')
    sources.append({"path": "e.jsonl"})
    m = write_manifest(tmp_path, small_tokenizer, sources, on_error="skip")
    r = pack(m, workers=2, progress=False)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["skipped"] == r.skipped
    for reason in ("malformed_json", "missing_field", "non_string_text", "invalid_utf8",
                   "corrupt_zst"):
        assert info["skipped"][reason] == 1, reason
    assert info["skipped"]["empty"] == 2          # "" and "   " (a blank JSONL line is no row)
    sample = {(Path(s["path"]).name, s["row"], s["reason"]) for s in info["skipped_sample"]}
    assert ("x.jsonl", 2, "malformed_json") in sample and ("x.txt", 2, "invalid_utf8") in sample
    kept = sorted((Path(d.source).name, d.row) for d in PackedDataset(tmp_path / "out"))
    # the good first row of each jsonl/txt source and "kept"; the truncated zst frame yields none
    assert kept == [("e.jsonl", 3)] + [("x.jsonl", 1)] * 3 + [("x.txt", 1)]


def test_empty_and_short_documents_are_counted_even_with_on_error_fail(small_tokenizer, tmp_path):
    (tmp_path / "v.txt").write_text("a verse of some length here\n\n   \nab\n")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}],
                       min_tokens=3)
    r = pack(m, workers=1, progress=False)
    assert r.documents == 1
    assert r.skipped == {"empty": 2, "too_short": 1}
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert {(s["row"], s["reason"]) for s in info["skipped_sample"]} == {
        (2, "empty"), (3, "empty"), (4, "too_short")}


def test_special_token_text_inside_a_document_is_not_a_separator(small_tokenizer, tmp_path):
    (tmp_path / "v.txt").write_text("before<|endoftext|>after\n")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    pack(m, workers=1, progress=False)
    tokens = PackedDataset(tmp_path / "out")[0].tokens.tolist()
    assert tokens.count(0) == 1 and tokens[-1] == 0


def test_all_rows_skipped_gives_an_empty_but_valid_dataset(small_tokenizer, tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n{"nope": 1}\n')
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "e.jsonl", "allow_empty": True}],
                       on_error="skip")
    r = pack(m, workers=1, progress=False)
    assert r.documents == 0 and r.skipped == {"empty": 1, "missing_field": 1}
    ds = PackedDataset(tmp_path / "out")
    assert len(ds) == 0 and ds.num_tokens == 0 and len(ds.window(0, 10)) == 0
    assert ds.doc_offsets.tolist() == [0]
    with pytest.raises(IndexError):
        ds[0]


def test_no_output_anywhere_is_an_error(small_tokenizer, tmp_path):
    (tmp_path / "v.txt").write_text("x\n")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt"}])
    raw = yaml.safe_load(m.read_text())
    del raw["output"]
    m.write_text(yaml.safe_dump(raw))
    with pytest.raises(Exception, match="no `output:`; give --out DIR"):
        pack(m, workers=1, progress=False)
    assert pack(m, out=tmp_path / "o", workers=1, progress=False).documents == 1


def test_a_damaged_work_unit_is_reported_deleted_and_redone(small_tokenizer, kjv_path, tmp_path):
    from qovaryx_data.errors import QovaryxDataError

    (tmp_path / "v.txt").write_text(kjv_path.read_text()[:50000])
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}],
                       unit_bytes=8192)
    pack(m, workers=1, progress=False)
    ref = files_of(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    (tmp_path / "out" / "dataset.json").unlink()          # as if killed before the end ...
    work = tmp_path / "out" / ".work"
    work.mkdir()
    (work / "fingerprint").write_text(info["fingerprint"] + "\n")
    (work / "unit-000002.npz").write_bytes(b"PK\x03\x04 half a zip")   # ... with a damaged unit
    with pytest.raises(QovaryxDataError, match=r"unit-000002.npz: a finished work unit is "
                                               r"unreadable .* re-run"):
        pack(m, workers=1, progress=False)
    r = pack(m, workers=1, progress=False)
    assert r.units_done == r.units - 2          # units 0 and 1 were finished by the failed run
    assert files_of(tmp_path / "out") == ref


def test_switching_the_validation_split_replaces_the_old_layout(small_tokenizer, kjv_path,
                                                                tmp_path):
    (tmp_path / "v.txt").write_text(kjv_path.read_text()[:30000])
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    n = pack(m, workers=1, progress=False).documents
    raw = yaml.safe_load(m.read_text())
    m.write_text(yaml.safe_dump({**raw, "validation": 0.1}))
    pack(m, workers=1, progress=False)
    out = tmp_path / "out"
    assert not (out / "dataset.json").exists() and not list(out.glob("shard-*"))
    assert len(PackedDataset(out / "train")) + len(PackedDataset(out / "val")) == n
    m.write_text(yaml.safe_dump(raw))
    pack(m, workers=1, progress=False)
    assert not (out / "train").exists() and len(PackedDataset(out)) == n


def test_chunked_units_give_the_same_bytes(text_corpus, fashion_mnist_dir, tmp_path, monkeypatch):
    """Rows are tokenized (and images decoded) chunk by chunk inside a unit: the chunk size,
    which bounds a worker's memory, never changes the output."""
    import qovaryx_data.packing.units as P
    from fmnist import load_fashion_mnist, write_png_source

    images, labels = load_fashion_mnist(fashion_mnist_dir, 30)
    write_png_source(tmp_path / "img", images, labels, text_only=text_corpus["verses"][:40])
    m = write_manifest(tmp_path, text_corpus["tok"],
                       [{"path": "img/rows.jsonl", "image_field": "image",
                         "decision_field": "label"},
                        {"path": str(text_corpus["root"] / "src" / "kjv.txt"), "split": "line"}],
                       images={"size": [28, 28], "mode": "L"})
    pack(m, out=tmp_path / "ref", workers=1, progress=False)
    monkeypatch.setattr(P, "CHUNK_ROWS", 7)
    monkeypatch.setattr(P, "CHUNK_PIXEL_BYTES", 3 * 28 * 28)       # 3 images per chunk
    r = pack(m, out=tmp_path / "small", workers=1, progress=False)
    assert files_of(tmp_path / "small") == files_of(tmp_path / "ref")
    ds = PackedDataset(tmp_path / "small")
    assert r.documents == 30 + 40 + KJV_LINES and len(ds.multimodal_doc_indices) == 30
    assert np.array_equal(ds[int(ds.multimodal_doc_indices[-1])].image[:, :, 0], images[-1])


def test_cli_reports_a_bad_row_with_file_and_line(small_tokenizer, tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "x.jsonl"}])
    result = CliRunner().invoke(main, ["pack", "--manifest", str(m), "--no-progress"])
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "x.jsonl" in result.output
    assert "line 2" in result.output or "row 2" in result.output


def test_a_non_empty_output_that_is_not_a_pack_is_refused(small_tokenizer, kjv_path, tmp_path):
    """pack never touches files it did not write: a non-empty --out with no earlier pack is
    refused unless --force, and even then (and on later re-packs) only pack's own names are
    replaced or deleted. Review finding 7."""
    src = tmp_path / "v.txt"
    src.write_text(kjv_path.read_text()[:3000])
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "v.txt", "split": "line"}])
    out = tmp_path / "out"
    mine = {"shard-000000.tar": b"my webdataset shard", "shard-00000.tok.bak": b"a backup",
            "notes.txt": b"keep", ".draft.tmpl": b"dot file", ".shard-00000.tok.tmp.mine": b"x"}
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "my_vocab.txt").write_bytes(b"mine")
    for name, data in mine.items():
        (out / name).write_bytes(data)
    before = files_of(out)

    with pytest.raises(QovaryxDataError, match=r"out: the output folder is not empty \(.*notes\.txt"
                                               r".*\) and holds no earlier pack .*--force"):
        pack(m, workers=1, progress=False)
    result = CliRunner().invoke(main, ["pack", "--manifest", str(m), "--no-progress"])
    assert result.exit_code == 2 and "pass --force" in result.stderr, result.output
    assert files_of(out) == before and not (out / ".pack.lock").exists()

    result = CliRunner().invoke(main, ["pack", "--manifest", str(m), "--no-progress", "--force"])
    assert result.exit_code == 0, result.output
    n = len(PackedDataset(out))
    assert n > 10 and all((out / name).read_bytes() == data for name, data in mine.items())
    assert not (out / "tokenizer" / "my_vocab.txt").exists()    # tokenizer/ is pack's own name

    src.write_text(kjv_path.read_text()[:1500])                 # a re-pack needs no --force now
    assert not pack(m, workers=1, progress=False).up_to_date
    assert 0 < len(PackedDataset(out)) < n
    assert all((out / name).read_bytes() == data for name, data in mine.items())
