"""Training batches of mixed rows, as docs/CONTRACTS.md ("Training batch") defines them.

Two kinds of example come out of a PackedDataset:

* a **text window**: ``n`` tokens of the concatenated stream (``ds.window``) inside one run of
  text-only rows (``ds.text_spans``), possibly spanning several documents, with ``document_ids``
  0, 1, 2, ... so attention stays inside a document;
* a **whole row** with an image and/or a decision label (``ds[i]``), never cut, padded to the
  batch length.

`collate` pads and stacks them into torch tensors::

    input_ids  int64 (B, T)     padded with pad_id (1)
    labels     int64 (B, T)     = input_ids, -100 at padding
    attention_mask int64 (B, T) 1 real token, 0 padding
    document_ids int64 (B, T)   per-row document index, -1 at padding   (when any window is in)
    pixel_values uint8 (B, C, H, W), image_mask bool (B,)   (when any row has an image)
    decision_labels int64 (B,) (-100: no label), decision_positions int64 (B,)  (when any label)

Example (a window of 4 tokens over text-only documents [5, 6, 7] [8, 9] ...)::

    document_starts(1, 4) = [2] -> window(1, 4) = [6, 7, 8, 9], document_ids [0, 0, 1, 1]

Windows only come from ``ds.text_spans``, the runs of text-only rows (DESIGN §3); a sampler
draws their starts with `window_starts` (epoch tiling) or `random_window_starts`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qovaryx_data.tokenizer import PAD_TOKEN, SPECIAL_TOKENS

if TYPE_CHECKING:
    import torch

PAD_ID = SPECIAL_TOKENS.index(PAD_TOKEN)   # <|pad|>: its fixed id (docs/CONTRACTS.md), 1
IGNORE_INDEX = -100  # HF convention: no loss


@dataclass(frozen=True, slots=True)
class Example:
    """One row of a batch before padding."""

    input_ids: np.ndarray                    # (t,) token ids
    document_ids: np.ndarray | None = None   # (t,) 0, 1, 2, ... per document; None: one document
    image: np.ndarray | None = None          # uint8 (H, W, C)
    decision: int | None = None              # class id, or None
    decision_position: int | None = None     # index into input_ids; None with a label: last token


def window_document_ids(starts: np.ndarray, n: int) -> np.ndarray:
    """Document index (from 0) of each of a window's `n` tokens, given the positions in the window
    where documents begin (`PackedDataset.document_starts`; a start at 0 is the window's own first
    document). A row with an image and no text is an empty document and takes no number.

        >>> window_document_ids(np.array([0, 2, 4]), 6).tolist()    # documents begin at 0, 2 and 4
        [0, 0, 1, 1, 2, 2]
    """
    marks = np.zeros(n, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    marks[starts[starts > 0]] = 1
    return np.cumsum(marks)


def text_window(ds: Any, start: int, n: int) -> Example:
    """A window of `n` tokens from the stream of `ds` (a PackedDataset) with its document ids.

    The window must lie inside one of ``ds.text_spans`` (runs of text-only rows): a row with an
    image or a decision label is served whole by `row_example`, never cut by a window, so a window
    reaching into one is a ValueError. Draw valid starts with `window_starts` or
    `random_window_starts`. Document boundaries come from binary searches in the shards' offset
    files, so a trainer's process never builds an array over all documents."""
    start, n = int(start), int(n)
    if n < 1 or start < 0:
        raise ValueError(f"text_window(start={start}, n={n}): need start >= 0 and n >= 1")
    spans = ds.text_spans
    k = int(np.searchsorted(spans[:, 0], start, side="right")) - 1
    if k < 0 or start + n > spans[k, 1]:
        if start + n > ds.num_tokens:
            why = f"it runs past the end of the dataset ({ds.num_tokens} tokens)"
        elif k >= 0 and start < spans[k, 1]:
            why = (f"the run of text-only rows holding token {start} ends at {int(spans[k, 1])} "
                   f"(ds.text_spans[{k}] = [{int(spans[k, 0])}, {int(spans[k, 1])}))")
        else:
            why = f"token {start} belongs to a row with an image or a decision label"
        raise ValueError(f"text_window({start}, {n}): tokens [{start}, {start + n}) are not "
                         f"inside one run of text-only rows: {why}. Rows with an image or a label "
                         "are served whole (row_example), never cut by a window; draw window "
                         "starts with window_starts(ds.text_spans, n) or random_window_starts")
    tokens = ds.window(start, n)
    assert len(tokens) == n, (start, n, len(tokens))
    return Example(np.asarray(tokens), window_document_ids(ds.document_starts(start, n), n))


def _valid_starts(spans: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    if n < 1:
        raise ValueError(f"window length n must be >= 1, got {n}")
    return spans[:, 0], np.maximum(spans[:, 1] - spans[:, 0] - n + 1, 0)   # first start, count


def window_starts(spans: np.ndarray, n: int, stride: int | None = None) -> np.ndarray:
    """Every start of a window of `n` tokens that `text_window` accepts, stepping by `stride`
    (default `n`: non-overlapping windows tiling each span from its start; a span's tail shorter
    than `n` is left out). int64, ascending. A sampler shuffles these per epoch (e.g. with a
    ``numpy.random.default_rng((seed, epoch))`` permutation) and takes every ``world_size``-th
    from its ``rank``.

        >>> window_starts(np.array([[0, 10], [12, 17], [20, 22]]), 4).tolist()
        [0, 4, 12]
        >>> window_starts(np.array([[0, 10], [12, 17]]), 4, stride=3).tolist()
        [0, 3, 6, 12]
    """
    first, valid = _valid_starts(spans, n)
    stride = n if stride is None else int(stride)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    per_span = np.where(valid > 0, (valid - 1) // stride + 1, 0)
    total = int(per_span.sum())
    before = np.cumsum(per_span) - per_span                        # windows in earlier spans
    k = np.arange(total, dtype=np.int64) - np.repeat(before, per_span)
    return np.repeat(first, per_span) + k * stride


def random_window_starts(spans: np.ndarray, n: int, count: int,
                         rng: np.random.Generator) -> np.ndarray:
    """`count` starts of `n`-token windows drawn uniformly, with replacement, from all the
    positions `text_window` accepts (a span of length L offers L - n + 1 of them), as nanoGPT
    samples its batches. ValueError when no span holds `n` tokens.

        >>> spans = np.array([[0, 10], [12, 17]])          # starts 0..6 and 12..13: 9 in all
        >>> s = random_window_starts(spans, 4, 1000, np.random.default_rng(0))
        >>> sorted(set(s.tolist())) == [0, 1, 2, 3, 4, 5, 6, 12, 13]
        True
    """
    first, valid = _valid_starts(spans, n)
    cum = np.cumsum(valid)
    total = int(cum[-1]) if len(cum) else 0
    if total == 0:
        longest = int((np.asarray(spans).reshape(-1, 2) @ [-1, 1]).max(initial=0))
        raise ValueError(f"no run of text-only rows holds a window of {n} tokens (the longest has "
                         f"{longest}); use a shorter window")
    u = rng.integers(0, total, size=count)
    k = np.searchsorted(cum, u, side="right")                       # the span each draw falls in
    return first[k] + (u - (cum[k] - valid[k]))


def row_example(ds: Any, i: int) -> Example:
    """Row `i` of `ds` whole: its tokens, image and decision label (if any)."""
    doc = ds[i]
    return Example(doc.tokens, None, doc.image, doc.decision, doc.decision_position)


def collate(examples: Sequence[Example], *, pad_id: int = PAD_ID, pad_to: int | None = None,
            image_shape: tuple[int, int, int] | None = None,
            decisions: bool | None = None) -> dict[str, torch.Tensor]:
    """Pad and stack `examples` into a training batch (see the module docstring).

    `pad_to` fixes T (a longer row is an error: rows with an image or a label are never cut);
    otherwise T is the longest row (at least 1). `image_shape` (H, W, C) makes ``pixel_values``
    present even when no row has an image; `decisions=True` does the same for the decision keys.
    """
    import torch

    if not examples:
        raise ValueError("collate: empty list of examples")
    lengths = [len(e.input_ids) for e in examples]
    T = max(1, max(lengths))
    if pad_to is not None:
        if T > pad_to:
            i = lengths.index(max(lengths))
            raise ValueError(f"collate: example {i} has {lengths[i]} tokens, more than pad_to="
                             f"{pad_to}; raise the sequence length or filter long rows out")
        T = pad_to
    B = len(examples)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention = np.zeros((B, T), dtype=np.int64)
    with_docs = any(e.document_ids is not None for e in examples)
    document_ids = np.full((B, T), -1, dtype=np.int64)
    for b, (e, t) in enumerate(zip(examples, lengths)):
        input_ids[b, :t] = e.input_ids
        attention[b, :t] = 1
        document_ids[b, :t] = 0 if e.document_ids is None else e.document_ids
    labels = np.where(attention == 1, input_ids, IGNORE_INDEX)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "attention_mask": torch.from_numpy(attention)}
    if with_docs:
        batch["document_ids"] = torch.from_numpy(document_ids)

    shapes = {e.image.shape for e in examples if e.image is not None}
    if image_shape is not None:
        shapes.add(tuple(image_shape))
    if len(shapes) > 1:
        raise ValueError(f"collate: images of different shapes {sorted(shapes)} in one batch")
    if shapes:
        H, W, C = shapes.pop()
        pixels = np.zeros((B, C, H, W), dtype=np.uint8)
        mask = np.zeros(B, dtype=bool)
        for b, e in enumerate(examples):
            if e.image is not None:
                pixels[b] = np.asarray(e.image).transpose(2, 0, 1)   # (H, W, C) -> (C, H, W)
                mask[b] = True
        batch["pixel_values"] = torch.from_numpy(pixels)
        batch["image_mask"] = torch.from_numpy(mask)

    if decisions or (decisions is None and any(e.decision is not None for e in examples)):
        dl = np.full(B, IGNORE_INDEX, dtype=np.int64)
        dp = np.zeros(B, dtype=np.int64)
        for b, (e, t) in enumerate(zip(examples, lengths)):
            if e.decision is None:
                continue
            pos = max(t - 1, 0) if e.decision_position is None else int(e.decision_position)
            if not 0 <= pos < max(t, 1):
                raise ValueError(f"collate: example {b} has decision_position {pos} outside its "
                                 f"{t} tokens")
            dl[b], dp[b] = int(e.decision), pos
        batch["decision_labels"] = torch.from_numpy(dl)
        batch["decision_positions"] = torch.from_numpy(dp)
    return batch
