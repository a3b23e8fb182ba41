"""Scale of the work units (issue 11): many small files, an up-to-date re-run that reads nothing,
line numbers counted by the workers, one large .jsonl.zst decoded once and tokenized on every
worker. Real text: the KJV verses (../shared)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from qovaryx_data import PackedDataset, SourceError
from qovaryx_data.packer import pack
from test_pack import files_of, write_manifest


def test_many_small_files_are_grouped_and_dataset_json_stays_small(small_tokenizer, kjv_path,
                                                                   tmp_path):
    """2,000 one-verse files (the layout of scraped corpora) make a few units of about
    unit_bytes, not one per file; the per-file records live in source_files.json, read on demand,
    so dataset.json (parsed at every open, in every DataLoader worker) does not grow with them."""
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:2000]
    (tmp_path / "verses").mkdir()
    for i, v in enumerate(verses):
        (tmp_path / "verses" / f"{i:05d}.txt").write_text(v, encoding="utf-8")
    m = write_manifest(tmp_path, small_tokenizer, [{"path": "verses", "format": "text"}],
                       unit_bytes=64 * 1024)
    r = pack(m, workers=2, progress=False)
    total = sum(len(v.encode()) for v in verses)
    assert r.documents == 2000 and r.units <= total // (64 * 1024) + 2
    out = tmp_path / "out"
    info = json.loads((out / "dataset.json").read_text())
    assert info["source_files_file"] == "source_files.json" and "source_files" not in info  # a 1.0 reader stops
    assert (out / "dataset.json").stat().st_size < 16_384
    ds = PackedDataset(out)
    assert ds._source_files is None                    # not read by opening ...
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    for i in (0, 999, 1999):                            # ... but by the first row asked for
        d = ds[i]
        assert (Path(d.source).name, d.row) == (f"{i:05d}.txt", 1)
        assert tok.decode(d.tokens[:-1].tolist()) == verses[i]
    ref = pack(m, out=tmp_path / "one", workers=1, progress=False)
    assert ref.units == r.units and files_of(tmp_path / "one") == files_of(out)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_an_up_to_date_rerun_reads_no_corpus(small_tokenizer, kjv_path, tmp_path):
    """"Up to date" is decided from file stats: the re-run reads dataset.json and the tokenizer,
    not the 4.4 MB corpus (planning counted its newlines before; now the workers count them)."""
    m = write_manifest(tmp_path, small_tokenizer, [{"path": str(kjv_path), "split": "line"}],
                       unit_bytes=256 * 1024)
    first = pack(m, workers=1, progress=False)
    assert not first.up_to_date and first.units > 10
    before = _bytes_read()
    again = pack(m, workers=1, progress=False)
    read = _bytes_read() - before
    assert again.up_to_date and again.documents == first.documents
    assert read < kjv_path.stat().st_size // 8, read


def test_line_numbers_are_the_files_own_across_units_and_workers(small_tokenizer, kjv_path,
                                                                 tmp_path):
    """Units are planned without counting lines; rows, skip samples and error messages still
    carry the file's own line numbers, whatever the unit size and worker count."""
    lines = kjv_path.read_bytes().split(b"\n")
    bad = 25_000                                     # 1-based line with invalid UTF-8
    lines[bad - 1] = lines[bad - 1] + b" \xff"
    (tmp_path / "v.txt").write_bytes(b"\n".join(lines))
    src = [{"path": "v.txt", "split": "line"}]
    m = write_manifest(tmp_path, small_tokenizer, src, unit_bytes=64 * 1024)
    with pytest.raises(SourceError, match=rf"v\.txt line {bad}: invalid UTF-8") as e:
        pack(m, workers=2, progress=False)
    assert e.value.row == bad
    m = write_manifest(tmp_path, small_tokenizer, src, unit_bytes=64 * 1024, on_error="skip")
    r = pack(m, workers=2, progress=False)
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    bad_rows = [(x["row"], x["reason"]) for x in info["skipped_sample"] if x["reason"] != "empty"]
    assert bad_rows == [(bad, "invalid_utf8")] and r.units > 50
    assert [x["message"] for x in info["skipped_sample"] if x["row"] == bad][0].startswith(
        f"{tmp_path / 'v.txt'} line {bad}:")
    ds = PackedDataset(tmp_path / "out")
    tok = Tokenizer.from_file(str(small_tokenizer / "tokenizer.json"))
    for i in (0, 1234, 20_000, 24_990, len(ds) - 1):     # each row decodes to its own line
        d = ds[i]
        assert tok.decode(d.tokens[:-1].tolist()) == lines[d.row - 1].decode()
    assert ds[len(ds) - 1].row == len(lines) - (lines[-1] == b"")


def test_one_large_jsonl_zst_is_decoded_once_and_tokenized_in_pieces(small_tokenizer, kjv_path,
                                                                      tmp_path):
    """One large .jsonl.zst (a zstd stream cannot be entered mid-way) is decoded once, in order,
    by the packing process, and its lines go to the workers in pieces of about unit_bytes: many
    tasks, not one, with output byte-identical for any worker count, and shards identical to the
    same lines packed from a plain .jsonl. A re-run after a failure resumes the finished pieces."""
    import zstandard

    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:12_000]
    data = "".join(json.dumps({"text": v}) + "\n" for v in verses).encode()
    for sub, name, payload in (("z", "kjv.jsonl.zst", zstandard.ZstdCompressor().compress(data)),
                               ("j", "kjv.jsonl", data)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_bytes(payload)
        write_manifest(tmp_path / sub, small_tokenizer, [{"path": name}], unit_bytes=64 * 1024,
                       shard_tokens=100_000)
    mz = tmp_path / "z" / "pack.yaml"
    one = pack(mz, out=tmp_path / "z1", workers=1, progress=False)
    two = pack(mz, out=tmp_path / "z2", workers=2, progress=False)
    assert two.units == one.units >= len(data) // (64 * 1024) and two.documents == 12_000
    assert files_of(tmp_path / "z1") == files_of(tmp_path / "z2")
    pack(tmp_path / "j" / "pack.yaml", out=tmp_path / "j1", workers=2, progress=False)
    shards = lambda d: {k: v for k, v in files_of(d).items() if k.startswith("shard-")}  # noqa: E731
    assert len(shards(tmp_path / "z1")) > 4 and shards(tmp_path / "z1") == shards(tmp_path / "j1")
    assert PackedDataset(tmp_path / "z1")[11_999].row == 12_000

    bad = data + b'{"text": "the last line is broken\n'
    (tmp_path / "z" / "kjv.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(bad))
    with pytest.raises(SourceError, match="kjv.jsonl.zst line 12001: malformed JSON"):
        pack(mz, out=tmp_path / "z3", workers=2, progress=False)
    work = tmp_path / "z3" / ".work"
    finished = {p.name: p.stat().st_mtime_ns for p in work.glob("unit-000000-*.npz")}
    assert len(finished) >= one.units - 2
    with pytest.raises(SourceError, match="line 12001"):
        pack(mz, out=tmp_path / "z3", workers=2, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in work.glob("unit-000000-*.npz")} == finished
