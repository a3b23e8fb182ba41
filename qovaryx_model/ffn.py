"""FFN backends, picked by `config.ffn_kind` from `FFN_REGISTRY`.

Every backend maps (B, T, d_model) -> (B, T, d_model) and returns `(out, aux)`, where `aux` is
None or a dict of per-layer router statistics (`aux_loss`, `z_loss`, `load`) that the model
averages over layers. Module names follow Llama (`gate_proj`, `up_proj`, `down_proj`).

Ternary weights can be exported packed at 2 bits per weight: see `pack_ternary` and docs/MODEL.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mark_residual_out(proj: nn.Module) -> None:
    """Mark the Linear that writes a projection's output (the B factor of a low-rank pair) as a
    residual-stream output, which `config.residual_init` scales or zeroes at init (model.py)."""
    (proj.b if isinstance(proj, LowRankLinear) else proj).residual_out = True


class SwiGLU(nn.Module):
    """Dense SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_model: int, d_ff: int, linear=nn.Linear):
        super().__init__()
        self.gate_proj = linear(d_model, d_ff, bias=False)
        self.up_proj = linear(d_model, d_ff, bias=False)
        self.down_proj = linear(d_ff, d_model, bias=False)
        mark_residual_out(self.down_proj)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


# ---------------------------------------------------------------------------------------------
# ternary (BitNet b1.58)
# ---------------------------------------------------------------------------------------------
def ternary_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and per-tensor scale: w ~= codes * gamma, codes in {-1, 0, 1}, gamma = mean|w|.

    >>> codes, g = ternary_quantize(torch.tensor([[0.9, -0.1], [-2.0, 0.2]]))  # gamma = 3.2 / 4
    >>> codes.int().tolist(), round(g.item(), 2)      # 1.125 -> 1, -0.125 -> 0, -2.5 -> -1, 0.25 -> 0
    ([[1, 0], [-1, 0]], 0.8)
    """
    gamma = w.detach().abs().mean().clamp(min=1e-5)
    return (w.detach() / gamma).round_().clamp_(-1, 1), gamma


class _TernaryWeightSTE(torch.autograd.Function):
    """W -> clip(round(W / gamma), -1, 1) * gamma with gamma = mean|W|; backward passes the gradient through."""

    @staticmethod
    def forward(ctx, w):
        codes, gamma = ternary_quantize(w)
        return codes.mul_(gamma).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _AbsmaxInt8STE(torch.autograd.Function):
    """Per-token 8-bit absmax: x -> round(x * s) / s with s = 127 / max|x| over the last dim.

    |x * s| <= 127 by construction, so no clamp is needed. Backward passes the gradient through.
    Four passes over x (inf-norm, mul, round, div): the activation quantization dominates the
    ternary overhead on CPU, so it is kept this lean.
    """

    @staticmethod
    def forward(ctx, x):
        s = 127.0 / torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).clamp_(min=1e-5)
        return (x * s).round_().div_(s)

    @staticmethod
    def backward(ctx, grad):
        return grad


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    return _TernaryWeightSTE.apply(w)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    return _AbsmaxInt8STE.apply(x)


class BitLinear(nn.Linear):
    """Linear layer with BitNet b1.58 quantization in the forward, straight-through in the backward.

    Latent weights stay float. Forward: W_q = clip(round(W / mean|W|), -1, 1) * mean|W| and per-token
    8-bit absmax activations x_q = round(x * 127 / max|x|) * max|x| / 127. Both use the STE
    (the gradient passes as if quantization were the identity).

    Restored from a packed ternary file (`hf.load_ternary_model`), `weight` holds the codes and the
    buffer `weight_scale` (1,) their scale, so W_q = codes * scale is the exported weight bit for bit.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)  # None: W_q from the latent weight

    def ternary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes in {-1, 0, 1} and the per-tensor scale of the forward's weight (W_q = codes * scale)."""
        if self.weight_scale is not None:
            return self.weight.detach(), self.weight_scale
        return ternary_quantize(self.weight)

    def quantized_weight(self) -> torch.Tensor:
        if self.weight_scale is not None:
            return self.weight * self.weight_scale
        return quantize_weight(self.weight)

    def forward(self, x: torch.Tensor, x_is_quantized: bool = False) -> torch.Tensor:
        xq = x if x_is_quantized else quantize_activations(x)
        return F.linear(xq, self.quantized_weight(), self.bias)


class TernarySwiGLU(SwiGLU):
    """SwiGLU of BitLinears; gate and up share one quantization of their common input."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__(d_model, d_ff, linear=BitLinear)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        xq = quantize_activations(x)  # (B, T, d)
        h = F.silu(self.gate_proj(xq, x_is_quantized=True)) * self.up_proj(xq, x_is_quantized=True)
        return self.down_proj(h), None


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes {-1, 0, 1} into uint8, 4 per byte, 2 bits each.

    Layout: flatten row-major, store c + 1 (0 -> -1, 1 -> 0, 2 -> +1), element i in byte i // 4 at
    bits 2*(i % 4) .. 2*(i % 4) + 1 (least significant first); the tail is padded with code 1 (0).

    >>> pack_ternary(torch.tensor([-1, 0, 1, 1, 0])).tolist()   # [0|1<<2|2<<4|2<<6, 1|1<<2|1<<4|1<<6]
    [164, 85]
    """
    flat = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, torch.ones(pad, dtype=torch.uint8)])
    q = flat.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `pack_ternary`: codes in {-1, 0, 1} (float32) of the given shape."""
    n = 1
    for s in shape:
        n *= s
    parts = [(packed >> (2 * j)) & 3 for j in range(4)]
    flat = torch.stack(parts, dim=1).reshape(-1)[:n].to(torch.float32) - 1
    return flat.view(*shape)


# ---------------------------------------------------------------------------------------------
# low-rank and routed low-rank
# ---------------------------------------------------------------------------------------------
class LowRankLinear(nn.Module):
    """W (out x in) factorized as B (out x r) @ A (r x in): two bias-free Linears."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.a = nn.Linear(d_in, rank, bias=False)
        self.b = nn.Linear(rank, d_out, bias=False)
        self.b.lowrank_b = True  # init: N(0, 1/sqrt(rank)) under initializer="normal" (model.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class LowRankSwiGLU(SwiGLU):
    def __init__(self, d_model: int, d_ff: int, rank: int):
        # SwiGLU asks its `linear` for bias=False projections; LowRankLinear has no bias at all
        super().__init__(d_model, d_ff, linear=lambda i, o, bias: LowRankLinear(i, o, rank))


class RoutedLowRankSwiGLU(nn.Module):
    """Top-k routed mixture of low-rank SwiGLU experts (Switch/GShard style, router in float32).

    out = sum over the chosen experts e of w_e * expert_e(x); w_e is the router probability for
    top-1 (so the router gets gradient from the task loss, as in the Switch Transformer) and the
    probabilities renormalized over the chosen experts for top-k > 1 (GShard/Mixtral).
    aux_loss = E * sum_e f_e * P_e (f_e: fraction of routed slots on e, P_e: mean probability of e):
    1 for a uniform router (not its minimum: docs/MODEL.md); f is a count, so the gradient reaches
    P only and lowers the probability of each expert in proportion to its load.
    z_loss = mean(logsumexp(logits)^2).
    """

    def __init__(self, d_model: int, d_ff: int, rank: int, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(LowRankSwiGLU(d_model, d_ff, rank) for _ in range(n_experts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router always runs in float32
            logits = F.linear(flat.float(), self.router.weight.float())  # (N, E)
            probs = logits.softmax(dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)

        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(top_i == e, as_tuple=True)
            if rows.numel() == 0:
                continue
            y, _ = expert(flat[rows])
            out.index_add_(0, rows, (y * top_p[rows, slot].unsqueeze(-1)).to(out.dtype))

        # router statistics over real tokens only
        keep = mask.reshape(-1) if mask is not None else torch.ones(B * T, dtype=torch.bool, device=x.device)
        n = keep.sum().clamp(min=1)
        onehot = F.one_hot(top_i, self.n_experts).sum(dim=1).float()  # (N, E)
        f = (onehot * keep[:, None]).sum(0) / (n * self.top_k)  # fraction of routed slots per expert
        p = (probs * keep[:, None]).sum(0) / n  # mean router probability per expert
        aux = {
            "aux_loss": self.n_experts * (f.detach() * p).sum(),
            "z_loss": (torch.logsumexp(logits, dim=-1).square() * keep).sum() / n,
            "load": f.detach(),
        }
        return out.view(B, T, D), aux


FFN_REGISTRY = {
    "swiglu": lambda c: SwiGLU(c.d_model, c.d_ff),
    "ternary_swiglu": lambda c: TernarySwiGLU(c.d_model, c.d_ff),
    "lowrank_swiglu": lambda c: LowRankSwiGLU(c.d_model, c.d_ff, c.ffn_rank),
    "routed_lowrank_swiglu": lambda c: RoutedLowRankSwiGLU(c.d_model, c.d_ff, c.ffn_rank, c.ffn_experts, c.ffn_top_k),
}


def build_ffn(config) -> nn.Module:
    return FFN_REGISTRY[config.ffn_kind](config)
