"""Attention of the Qovaryx decoder: RoPE, the attention mask (causal, padding, document
boundaries, static-cache slots), GQA attention over SDPA or flash-attn 2 (dense and varlen).

Shapes: B batch, T tokens, H query heads, KV key/value heads, hd head_dim, d d_model. Copied into
every exported model folder with model.py (transformers copies its relative imports), so it imports
only torch, transformers and its siblings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from .config import QovaryxConfig
from .ffn import mark_residual_out


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """(B, S) integer positions -> cos, sin of shape (B, 1, S, hd) (computed in float32)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions[..., None].float() * inv_freq  # (B, S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, S, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Llama/NeoX layout): x (B, h, S, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)  # stays bf16 under autocast


@dataclass
class AttnMask:
    """How attention is masked in one forward.

    dense: bool (B, 1, Tq, Tk), True = may attend, or None; is_causal: plain causal (SDPA's fast path);
    positions: (B, Tq) positions, used to cut flash-attn varlen segments when `varlen` is set;
    flash_ok: no padding anywhere, so flash-attn (dense causal or varlen) can be used;
    past: cached tokens before the queries (query i is key `past + i`).
    """

    dense: torch.Tensor | None
    is_causal: bool
    positions: torch.Tensor | None = None
    varlen: bool = False
    flash_ok: bool = False
    past: int = 0

    def truncate(self, start: int, length: int) -> "AttnMask":
        """The mask among the queries [start, start + length) alone, for a cache-free forward over them
        (MTP depths). With a KV cache the dense mask's keys begin with the `past` cached tokens, so the
        queries' own keys start `past` columns further on."""
        dense = None
        if self.dense is not None:
            k0 = self.past + start
            dense = self.dense[..., start:start + length, k0:k0 + length]
        pos = None if self.positions is None else self.positions[:, start:start + length]
        return AttnMask(dense, self.is_causal, pos, self.varlen, self.flash_ok)


def build_mask(valid: torch.Tensor | None, docs: torch.Tensor | None, positions: torch.Tensor,
               q_len: int, past: int, kv_len: int | None = None) -> AttnMask:
    """valid: (B, past + q_len) real-token mask or None; docs: (B, q_len) document ids or None;
    kv_len: keys the attention gets (default past + q_len; a static cache's whole preallocated length,
    whose slots after the queries causality masks).

    An all-real `valid` and a single document per row are dropped first, so that the common
    training batch keeps SDPA's `is_causal` fast path (and flash-attn's dense kernel).
    """
    kv_len = past + q_len if kv_len is None else kv_len
    if valid is not None and bool(valid.all()):
        valid = None
    if docs is not None and bool((docs == docs[:, :1]).all()):
        docs = None
    exact = kv_len == past + q_len  # no unfilled cache slots among the keys
    if valid is None and docs is None and exact:
        if past == 0 or q_len == 1:  # plain causal, or one new token that sees the whole cache
            return AttnMask(None, is_causal=past == 0 and q_len > 1, flash_ok=True)
    device = positions.device
    i = torch.arange(q_len, device=device)[:, None] + past  # (Tq, 1) absolute query index
    j = torch.arange(kv_len, device=device)[None, :]  # (1, Tk)
    m = (j <= i)[None, None]  # (1, 1, Tq, Tk) causal
    if valid is not None:
        if valid.shape[1] < kv_len:  # a static cache's unfilled slots hold no token
            valid = torch.cat([valid, valid.new_zeros(valid.shape[0], kv_len - valid.shape[1])], 1)
        m = m & valid[:, None, None, :]
    if docs is not None:
        m = m & (docs[:, None, :, None] == docs[:, None, None, :])
    m = m | (j == i)[None, None]  # every query sees itself: padded rows stay finite, never NaN
    return AttnMask(m, is_causal=False, positions=positions, varlen=docs is not None,
                    flash_ok=valid is None and exact, past=past)


def prepared_mask(mask: torch.Tensor, past: int, q_len: int, kv_len: int):
    """A 4-D mask as transformers prepares it (e.g. `generate()` with a static cache): (B, 1, Tq, Tk),
    bool (True = may attend) or additive float (0 = may attend). Returns the AttnMask, the real
    queries (B, Tq) (those allowed to see themselves) and their positions (B, Tq): the keys a
    causal query sees, less one.

    >>> m = torch.tensor([[0, 0, 0], [0, 1, 0], [0, 1, 1]]).bool()[None, None]  # token 0 is padding
    >>> _, real, pos = prepared_mask(m, 0, 3, 3)
    >>> real.tolist(), pos.tolist()
    ([[False, True, True]], [[0, 0, 1]])
    """
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        raise ValueError(f"a 4-D attention_mask must have shape (B, 1, {q_len}, {kv_len}) (queries, keys "
                         f"including the cache); got {tuple(mask.shape)}. Or pass the 2-D (B, T) padding mask")
    dense = mask[:, :1] if mask.dtype == torch.bool else mask[:, :1] == 0
    i = torch.arange(q_len, device=mask.device)
    real = dense[:, 0, i, past + i]  # (B, Tq)
    positions = (dense[:, 0].sum(-1) - 1).clamp(min=0)  # (B, Tq)
    dense = dense.clone()
    dense[:, :, i, past + i] = True  # every query sees itself: padded rows stay finite, never NaN
    return AttnMask(dense, is_causal=False, past=past), real, positions


def positions_for(valid: torch.Tensor, docs: torch.Tensor | None) -> torch.Tensor:
    """Positions counting real tokens only, restarting at 0 at each document start. (B, S) -> (B, S).

    >>> positions_for(torch.tensor([[1, 1, 1, 1, 1]]).bool(), torch.tensor([[0, 0, 1, 1, 1]])).tolist()
    [[0, 1, 0, 1, 2]]
    """
    B, S = valid.shape
    idx = torch.arange(S, device=valid.device).expand(B, S)
    count = valid.long().cumsum(1)  # real tokens up to and including s
    if docs is None:
        return (count - 1).clamp(min=0)
    start = torch.ones_like(valid)
    start[:, 1:] = docs[:, 1:] != docs[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(1).values  # index of the doc's first token
    before = (count - valid.long()).gather(1, first)  # real tokens before the document starts
    return (count - 1 - before).clamp(min=0)


_FLASH = None


def _flash_attn():
    """flash_attn module or None (imported lazily: it only exists on CUDA machines)."""
    global _FLASH
    if _FLASH is None:
        try:
            import flash_attn

            _FLASH = flash_attn
        except ImportError:
            _FLASH = False
    return _FLASH or None


def varlen_segments(positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """flash-attn varlen segments of a (B, T) batch flattened row-major: a segment starts where the
    position restarts at 0 (a document start) and at every row start. Returns int32 cu_seqlens and
    the longest segment.

    >>> cu, longest = varlen_segments(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]]))
    >>> cu.tolist(), longest
    ([0, 3, 5, 7, 10], 3)
    """
    B, T = positions.shape
    is_start = positions == 0
    is_start[:, 0] = True  # an MTP slice (or an image row's text) may begin mid-document
    starts = torch.nonzero(is_start.reshape(-1)).flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def attend(q, k, v, mask: AttnMask, backend: str) -> torch.Tensor:
    """q (B, H, Tq, hd), k/v (B, KV, Tk, hd) -> (B, H, Tq, hd). GQA without repeating K/V."""
    if backend == "flash" and mask.flash_ok and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        fa = _flash_attn()
        if fa is not None:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T, h, hd)
            if not mask.varlen:  # causal is bottom-right aligned in flash-attn >= 2.1, so caches work
                return fa.flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)
            B, T = mask.positions.shape
            cu, max_len = varlen_segments(mask.positions)
            out = fa.flash_attn_varlen_func(qt.reshape(B * T, *qt.shape[2:]), kt.reshape(B * T, *kt.shape[2:]),
                                            vt.reshape(B * T, *vt.shape[2:]), cu, cu, max_len, max_len, causal=True)
            return out.view(B, T, *out.shape[1:]).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.is_causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, config: QovaryxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.backend = layer_idx, config.attn_backend
        self.n_head, self.n_kv, self.hd = config.n_head, config.n_kv_head, config.head_dim
        d = config.d_model
        self.q_proj = nn.Linear(d, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, d, bias=False)
        mark_residual_out(self.o_proj)
        # optional QK-norm: RMSNorm over head_dim of every query and key head, before RoPE
        self.q_norm = nn.RMSNorm(self.hd, eps=config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.hd, eps=config.rms_norm_eps) if config.qk_norm else None

    def forward(self, x, rope, mask: AttnMask, cache: Cache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, past + T, hd)
        y = attend(q, k, v, mask, self.backend)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))
