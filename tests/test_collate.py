"""qovaryx_data.collate: padding, masks, images and decision labels per docs/CONTRACTS.md."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist import load_fashion_mnist
from qovaryx_data.collate import Example, collate, window_document_ids


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
