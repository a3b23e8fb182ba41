"""Known-answer bytes of the packed format (docs/FORMAT.md): a two-document pack with a word-level
tokenizer whose ids are known, checked byte by byte."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers

from qovaryx_data.errors import FormatError
from qovaryx_data.format import (HEADER_SIZE, file_entry, pack_header, parse_header, read_header,
                                 token_dtype)
from qovaryx_data.packer import pack


@pytest.fixture
def tiny(tmp_path):
    vocab = {"<|endoftext|>": 0, "<unk>": 1, "alpha": 2, "beta": 3, "gamma": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "t.txt").write_text("alpha beta gamma\ngamma\n")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "tokenizer": "tok", "output": "out",
         "sources": [{"path": "t.txt", "split": "line"}]}))
    pack(tmp_path / "m.yaml", workers=1, progress=False)
    return tmp_path / "out"


def test_token_and_offset_files_byte_for_byte(tiny):
    tok = (tiny / "shard-00000.tok").read_bytes()
    # 6 tokens: alpha beta gamma <eot> gamma <eot>, uint16 (code 2), then 4 bytes of padding
    assert tok == (b"QVXTOK\0\0" + struct.pack("<HHB3xQ3I28x", 1, 1, 2, 6, 0, 0, 0)
                   + np.array([2, 3, 4, 0, 4, 0], "<u2").tobytes() + b"\0" * 4)
    idx = (tiny / "shard-00000.idx").read_bytes()
    assert idx == (b"QVXIDX\0\0" + struct.pack("<HHB3xQ3I28x", 1, 1, 4, 3, 0, 0, 0)
                   + np.array([0, 4, 6], "<i8").tobytes())
    assert len(idx) % 8 == 0 and HEADER_SIZE % 8 == 0


def test_header_helpers_and_dtype_rule(tmp_path):
    assert token_dtype(20_242) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    with pytest.raises(ValueError):
        token_dtype(0)
    raw = pack_header("images", np.uint8, 3, (28, 28, 1))
    h = parse_header(raw, "x.img", "images")
    assert (h.count, h.item_shape, h.item_bytes, h.file_size) == (3, (28, 28, 1), 784, 64 + 3 * 784)
    p = tmp_path / "short.tok"
    p.write_bytes(pack_header("tokens", np.uint16, 5) + b"\0" * 8)   # 5 tokens need 10 -> 16 bytes
    with pytest.raises(FormatError, match=r"72 bytes on disk, expected 80"):
        read_header(p, "tokens")
    p.write_bytes(b"QVX")
    with pytest.raises(FormatError, match="shorter than the 64-byte header"):
        read_header(p, "tokens")
    with pytest.raises(FormatError, match=r"short.tok.gone: missing"):
        read_header(tmp_path / "short.tok.gone", "tokens")


def test_a_format_1_0_dataset_still_opens(tiny):
    """Format 1.0 listed source_files inline in dataset.json and wrote minor version 0 in the
    headers; 1.1 readers open it (FORMAT.md "Versioning": 1.1 readers read 1.0)."""
    import json

    from qovaryx_data import PackedDataset, verify

    info = json.loads((tiny / "dataset.json").read_text())
    side = json.loads((tiny / "source_files.json").read_text())
    assert side == {"format": "qovaryx-source-files", "version": 1,
                    "files": [str((tiny.parent / "t.txt").resolve())]}
    for name in ("shard-00000.tok", "shard-00000.idx"):          # headers as 1.0 wrote them
        raw = bytearray((tiny / name).read_bytes())
        raw[10:12] = struct.pack("<H", 0)
        (tiny / name).write_bytes(bytes(raw))
    (tiny / "source_files.json").unlink()
    del info["files"]["source_files.json"]
    for name in ("shard-00000.tok", "shard-00000.idx"):
        info["files"][name] = file_entry(tiny / name)
    del info["source_files_file"]
    info.update(format_version="1.0", source_files=side["files"])
    (tiny / "dataset.json").write_text(json.dumps(info))
    ds = PackedDataset(tiny)
    assert read_header(tiny / "shard-00000.tok", "tokens").minor == 0
    assert [(d.tokens.tolist(), d.source, d.row) for d in ds] == [
        ([2, 3, 4, 0], side["files"][0], 1), ([4, 0], side["files"][0], 2)]
    assert verify(tiny).ok
    (tiny / "dataset.json").write_text(json.dumps({**info, "source_files": "source_files.json"}))
    with pytest.raises(FormatError, match=r"source_files\.json: unreadable"):  # the first 1.1 writes' key
        PackedDataset(tiny)[0]
    del info["source_files"]
    (tiny / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match=r"neither 'source_files' \(format 1.0\) nor 'source_files_file'"):
        PackedDataset(tiny)[0]
