"""qovaryx_data.collate: padding, masks, images and decision labels per docs/CONTRACTS.md."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fmnist import DECISION_NAMES, load_fashion_mnist
from qovaryx_data import PackedDataset
from qovaryx_data.collate import (Example, collate, random_window_starts, text_window,
                                  window_document_ids, window_starts)
from qovaryx_data.packer import pack


def _ids(offs, start, n):
    """window_document_ids fed as a PackedDataset with these document offsets would feed it."""
    inside = offs[(offs >= start) & (offs < start + n)]
    return window_document_ids(np.unique(inside) - start, n)


def test_window_document_ids_known_answers():
    offs = np.array([0, 3, 5, 5, 9, 12], dtype=np.int64)
    assert _ids(offs, 0, 12).tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert _ids(offs, 1, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert _ids(offs, 3, 2).tolist() == [0, 0]      # exactly one document
    assert _ids(offs, 4, 1).tolist() == [0]
    assert _ids(offs, 8, 2).tolist() == [0, 1]      # boundary at the last token


def test_collate_mixed_batch(fashion_mnist_dir):
    images, labels = load_fashion_mnist(fashion_mnist_dir, 2)
    img0, img1 = images[0][:, :, None], images[1][:, :, None]
    window = Example(np.array([10, 11, 0, 12, 13], np.uint16), np.array([0, 0, 0, 1, 1]))
    with_image_and_label = Example(np.array([20, 21, 22], np.uint16), None, img0, 3, 1)
    label_only = Example(np.array([30, 31], np.uint32), None, None, 2, None)   # last token
    image_only = Example(np.array([], np.uint16), None, img1, None, None)      # no text at all
    b = collate([window, with_image_and_label, label_only, image_only])

    assert set(b) == {"input_ids", "labels", "attention_mask", "document_ids", "pixel_values",
                      "image_mask", "decision_labels", "decision_positions"}
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, 5)
    assert b["input_ids"].tolist() == [[10, 11, 0, 12, 13], [20, 21, 22, 1, 1],
                                       [30, 31, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert b["labels"].tolist() == [[10, 11, 0, 12, 13], [20, 21, 22, -100, -100],
                                    [30, 31, -100, -100, -100], [-100] * 5]
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0] * 5]
    assert b["document_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, -1, -1],
                                          [0, 0, -1, -1, -1], [-1] * 5]
    assert b["pixel_values"].dtype == torch.uint8 and b["pixel_values"].shape == (4, 1, 28, 28)
    assert b["image_mask"].tolist() == [False, True, False, True]
    assert torch.equal(b["pixel_values"][1, 0], torch.tensor(images[0]))
    assert torch.equal(b["pixel_values"][3, 0], torch.tensor(images[1]))
    assert b["pixel_values"][[0, 2]].sum() == 0
    assert b["decision_labels"].tolist() == [-100, 3, 2, -100]
    assert b["decision_positions"].tolist() == [0, 1, 1, 0]


def test_collate_rgb_channels_first():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)           # (H, W, C)
    b = collate([Example(np.array([5]), image=img)])
    assert b["pixel_values"].shape == (1, 3, 2, 3)
    for c in range(3):
        assert b["pixel_values"][0, c].tolist() == img[:, :, c].tolist()


def test_collate_text_only_omits_optional_keys_unless_asked():
    ex = [Example(np.array([5, 6, 7]), np.array([0, 0, 1])), Example(np.array([8, 9, 10]))]
    b = collate(ex)
    assert set(b) == {"input_ids", "labels", "attention_mask", "document_ids"}
    b = collate(ex, pad_to=4, image_shape=(2, 2, 1), decisions=True)
    assert b["input_ids"].shape == (2, 4) and b["pixel_values"].shape == (2, 1, 2, 2)
    assert b["image_mask"].tolist() == [False, False]
    assert b["decision_labels"].tolist() == [-100, -100]
    b = collate([Example(np.array([5, 6]))])
    assert "document_ids" not in b


def test_padding_uses_the_tokenizers_pad_id(small_tokenizer):
    """collate pads with the id a train-bpe tokenizer gives <|pad|> (one definition: the
    special-token list in qovaryx_data.tokenizer), and labels ignore the padding."""
    from qovaryx_data import load_tokenizer
    from qovaryx_data.collate import IGNORE_INDEX, PAD_ID

    pad = load_tokenizer(small_tokenizer).token_to_id("<|pad|>")
    assert PAD_ID == pad == 1
    b = collate([Example(np.array([5, 6, 7])), Example(np.array([8]))])
    assert b["input_ids"][1].tolist() == [8, pad, pad]
    assert b["labels"][1].tolist() == [8, IGNORE_INDEX, IGNORE_INDEX]


def test_collate_refuses_inconsistent_input():
    with pytest.raises(ValueError, match="pad_to"):
        collate([Example(np.arange(5))], pad_to=4)
    with pytest.raises(ValueError, match="different shapes"):
        collate([Example(np.arange(2), image=np.zeros((2, 2, 1), np.uint8)),
                 Example(np.arange(2), image=np.zeros((3, 2, 1), np.uint8))])
    with pytest.raises(ValueError, match="decision_position 2"):
        collate([Example(np.arange(2), decision=1, decision_position=2)])
    with pytest.raises(ValueError, match="empty"):
        collate([])


# ---- text windows stay inside runs of text-only rows (DESIGN §3; PackedDataset.text_spans) ----

def test_window_starts_known_answers():
    spans = np.array([[0, 10], [12, 17], [20, 22]], dtype=np.int64)
    assert window_starts(spans, 4).tolist() == [0, 4, 12]                # tails < 4 left out
    assert window_starts(spans, 4, stride=3).tolist() == [0, 3, 6, 12]
    assert window_starts(spans, 2, stride=1).tolist() == [*range(9), *range(12, 16), 20]
    assert window_starts(spans, 11).tolist() == [] and window_starts(spans[:0], 3).tolist() == []
    draws = random_window_starts(spans, 4, 2000, np.random.default_rng(0))
    assert set(draws.tolist()) == {0, 1, 2, 3, 4, 5, 6, 12, 13}          # every valid start
    with pytest.raises(ValueError, match="longest has 10"):
        random_window_starts(spans, 11, 5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n must be >= 1"):
        window_starts(spans, 0)


@pytest.fixture(scope="module", params=["eos", "none"])
def mixed(request, tmp_path_factory, fashion_mnist_dir, kjv_path, small_tokenizer):
    """Rows of every kind in a random order -- text only, image + label, image only with empty
    text (no tokens at all under ``separator: none``), label only -- then a plain-text source, in
    shards of 300 tokens, so runs of text-only rows cross shard and source boundaries."""
    root = tmp_path_factory.mktemp(f"mixed-{request.param}")
    images, labels = load_fashion_mnist(fashion_mnist_dir, 40)
    verses = kjv_path.read_text(encoding="utf-8").splitlines()[:200]
    (root / "img").mkdir()
    rng = np.random.default_rng(7)
    kinds = ["text", "empty_image", "text"] + rng.choice(
        ["text", "text", "image_label", "empty_image", "label"], size=117).tolist()
    rows, v = [], iter(verses)
    for i, kind in enumerate(kinds):
        rel = f"img/{i % 40}.png"
        if kind != "text" and not (root / rel).exists():
            Image.fromarray(images[i % 40]).save(root / rel)
        rows.append({"text": {"text": next(v), "image_label": f"image {i}",
                              "empty_image": "", "label": f"label {i}"}[kind]}
                    | ({"image": rel} if kind in ("image_label", "empty_image") else {})
                    | ({"label": int(labels[i % 40]) % 4} if kind in ("image_label", "label")
                       else {}))
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "more.txt").write_text("\n".join(verses[150:]) + "\n", encoding="utf-8")
    m = {"name": "mixed", "tokenizer": str(small_tokenizer), "output": "out", "shard_tokens": 300,
         "separator": request.param, "images": {"size": [28, 28], "mode": "L"},
         "sources": [{"path": "rows.jsonl", "image_field": "image", "decision_field": "label",
                      "decision_labels": DECISION_NAMES},
                     {"path": "more.txt", "split": "line"}]}
    (root / "pack.yaml").write_text(yaml.safe_dump(m))
    pack(root / "pack.yaml", workers=1, progress=False)
    ds = PackedDataset(root / "out")
    assert len(ds) == len(rows) + 50 and len(ds.info["shards"]) >= 4
    # the reference, row by row: each row's [start, end) and whether it is text-only
    bounds, is_text, pos = [], [], 0
    for i in range(len(ds)):
        d = ds[i]
        bounds.append((pos, pos + len(d.tokens)))
        is_text.append(d.image is None and d.decision is None)
        pos += len(d.tokens)
    return {"ds": ds, "bounds": bounds, "is_text": is_text, "sep": request.param,
            "stream": np.concatenate([ds[i].tokens for i in range(len(ds))])}


def _reference_spans(bounds, is_text):
    spans, cur = [], None
    for (a, b), t in zip(bounds, is_text):
        if t:
            cur = [a, b] if cur is None else [cur[0], b]
        else:
            if cur is not None and cur[1] > cur[0]:
                spans.append(cur)
            cur = None
    if cur is not None and cur[1] > cur[0]:
        spans.append(cur)
    return spans


def _window_rows_are_text_only(mixed, start, n) -> bool:
    """No token of [start, start+n) belongs to, and no row without tokens sits strictly inside
    it, a row with an image or a label."""
    for (a, b), t in zip(mixed["bounds"], mixed["is_text"]):
        if not t and ((a < start + n and b > start) or start < a < start + n):
            return False
    return True


def test_text_spans_are_the_runs_of_text_only_rows(mixed):
    ds = mixed["ds"]
    spans = ds.text_spans
    assert spans.dtype == np.int64 and spans.ndim == 2 and spans.shape[1] == 2
    assert spans.tolist() == _reference_spans(mixed["bounds"], mixed["is_text"])
    assert ds.text_spans is spans                                      # built once
    assert len(spans) > 10 and (spans[1:, 0] >= spans[:-1, 1]).all()
    shard_ends = np.cumsum([s["num_tokens"] for s in ds.info["shards"]])[:-1]
    crossing = [(a, b) for a, b in spans.tolist() if any(a < e < b for e in shard_ends)]
    assert crossing                                                    # spans cross shards
    a, b = crossing[0]
    w = text_window(ds, a, b - a)                                      # a copy, accepted
    assert w.input_ids.tolist() == mixed["stream"][a:b].tolist()
    if mixed["sep"] == "none":
        # an image row without tokens still ends a run: two spans touch where it sits
        assert (spans[1:, 0] == spans[:-1, 1]).any()


def test_windows_from_the_helpers_hold_only_text_rows(mixed):
    ds, stream = mixed["ds"], mixed["stream"]
    rng = np.random.default_rng(0)
    for n in (1, 6, 40):
        # brute force: every start whose window holds text-only rows
        valid = [p for p in range(ds.num_tokens - n + 1) if _window_rows_are_text_only(mixed, p, n)]
        assert window_starts(ds.text_spans, n, stride=1).tolist() == valid
        tiled = window_starts(ds.text_spans, n)
        assert set(tiled.tolist()) <= set(valid) and (np.diff(tiled) >= n).all()
        drawn = random_window_starts(ds.text_spans, n, 300, rng)
        assert set(drawn.tolist()) <= set(valid) and len(set(drawn.tolist())) > 100
        for p in [*tiled.tolist(), *drawn[:50].tolist()]:
            ex = text_window(ds, p, n)
            assert ex.input_ids.tolist() == stream[p:p + n].tolist()
    assert len(valid) < ds.num_tokens - 40 + 1                         # some starts are refused


def test_text_window_refuses_a_window_across_an_image_row(mixed):
    ds, bounds, is_text = mixed["ds"], mixed["bounds"], mixed["is_text"]
    # a row with an image or a label and tokens, right after a text-only row with >= 2 tokens
    i = next(i for i in range(1, len(ds)) if not is_text[i] and bounds[i][1] > bounds[i][0]
             and is_text[i - 1] and bounds[i - 1][1] - bounds[i - 1][0] >= 2)
    a = bounds[i][0]
    assert text_window(ds, a - 2, 2).input_ids.tolist() == mixed["stream"][a - 2:a].tolist()
    with pytest.raises(ValueError, match=r"not inside one run of text-only rows: the run of "
                                         r"text-only rows holding token \d+ ends at " + str(a)):
        text_window(ds, a - 2, 3)                                      # cuts into the row
    with pytest.raises(ValueError, match=f"token {a} belongs to a row with an image or a "
                                         "decision label.*row_example.*window_starts"):
        text_window(ds, a, 1)
    with pytest.raises(ValueError, match="past the end"):
        text_window(ds, ds.num_tokens - 3, 4)
    with pytest.raises(ValueError, match="n >= 1"):
        text_window(ds, 0, 0)
    if mixed["sep"] == "none":
        # an image row without tokens between two text rows: a window over it is refused too
        i = next(i for i in range(1, len(ds) - 1) if not is_text[i] and is_text[i - 1]
                 and is_text[i + 1] and bounds[i][0] == bounds[i][1] and
                 bounds[i - 1][1] > bounds[i - 1][0] and bounds[i + 1][1] > bounds[i + 1][0])
        p = bounds[i][0]
        text_window(ds, p - 1, 1), text_window(ds, p, 1)
        with pytest.raises(ValueError, match="not inside one run"):
            text_window(ds, p - 1, 2)
