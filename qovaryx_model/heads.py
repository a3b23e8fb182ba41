"""Heads beside the trunk: MTP depths, the decision head, the chart-patch encoder.

Only the modules live here; the loss bookkeeping is in model.py so the forward reads in one place.
"""
from __future__ import annotations

import torch
from torch import nn


class MTPDepth(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth.

    h'_i = proj([RMSNorm(h_prev_i) ; RMSNorm(emb(t_{i+k}))]); h_i = block(h'_i); logits = head(norm(h_i)).
    The embedding and the output head are the trunk's (shared); `block` is a full transformer block.
    """

    def __init__(self, d_model: int, eps: float, block: nn.Module):
        super().__init__()
        self.norm_h = nn.RMSNorm(d_model, eps=eps)
        self.norm_e = nn.RMSNorm(d_model, eps=eps)
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(d_model, eps=eps)  # final norm before the shared head

    def combine(self, h_prev: torch.Tensor, emb_ahead: torch.Tensor) -> torch.Tensor:
        # (B, L, d), (B, L, d) -> (B, L, d)
        x = self.proj(torch.cat([self.norm_h(h_prev), self.norm_e(emb_ahead)], dim=-1))
        return x.to(h_prev.dtype)  # keep the residual stream's dtype (fp32 under autocast, like the trunk)


def real_token_index(real: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Index in the padded row of each row's `positions`-th real token: real (B, T) bool, positions (B,).
    A row without real tokens gives its last slot.

    >>> real = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()   # left and right padding
    >>> real_token_index(real, torch.tensor([0, 2])).tolist()
    [2, 2]
    """
    return (real.long().cumsum(1) <= positions[:, None]).sum(1).clamp(max=real.shape[1] - 1)


class DecisionHead(nn.Module):
    """Linear classifier over the (final-normed) hidden state pooled at one text position per row."""

    def __init__(self, d_model: int, n_classes: int):
        super().__init__()
        self.proj = nn.Linear(d_model, n_classes, bias=True)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        # hidden (B, T, d), positions (B,) counted among the real tokens `real` (B, T) (None: all) -> logits (B, C) float32
        index = positions if real is None else real_token_index(real, positions)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), index]
        return self.proj(pooled).float()


class PatchEncoder(nn.Module):
    """Raw pixels -> prefix embeddings: Conv2d with kernel = stride = patch_size, plus a learned
    position embedding per patch (raster order).

    (B, C, H, W) uint8 -> (B, (H/p)*(W/p), d_model); pixels are scaled to [0, 1].
    """

    def __init__(self, channels: int, image_size: int, patch_size: int, d_model: int):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.conv = nn.Conv2d(channels, d_model, kernel_size=patch_size, stride=patch_size, bias=True)
        self.pos = nn.Parameter(torch.zeros((image_size // patch_size) ** 2, d_model))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.channels, self.image_size, self.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, {', '.join(map(str, expected))}) "
                "as set by image_channels/image_size in the model config (resize when packing)"
            )
        x = pixel_values.to(self.conv.weight.dtype) / 255.0
        x = self.conv(x)  # (B, d, H/p, W/p)
        return x.flatten(2).transpose(1, 2) + self.pos  # (B, N, d)
