"""Optimizers (a registry keyed by the recipe's `optimizer`) and the learning-rate schedule.

Weight decay applies to matrices only: never to norms, biases, embeddings (they are looked up, not
multiplied) or other 1-D parameters, as nanoGPT and OLMo do.

    >>> lr = lr_at(0, lr=1e-3, min_lr=1e-4, warmup=10, total=100)        # first step of warmup
    >>> round(lr, 6), round(lr_at(9, 1e-3, 1e-4, 10, 100), 6), round(lr_at(99, 1e-3, 1e-4, 10, 100), 6)
    (0.0001, 0.001, 0.0001)
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn


def param_groups(model: nn.Module, recipe) -> list[dict]:
    """qovaryx_model.muon's groups: decayed matrices and head; undecayed embeddings, position tables,
    norms and biases (one rule for every optimizer); the matrices and the embedding at their
    multiples of the peak lr."""
    from ..muon import param_groups as groups

    return groups(model, recipe.lr, recipe.weight_decay, embed_lr_mult=recipe.embed_lr_mult,
                  matrix_lr_mult=recipe.matrix_lr_mult)


def _adamw(model, recipe, device) -> torch.optim.Optimizer:
    """torch.optim.AdamW, with the fused kernel where this device has it (CUDA, and CPU in recent torch)."""
    kw = dict(lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    try:
        return torch.optim.AdamW(param_groups(model, recipe), fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(param_groups(model, recipe), **kw)


_WARNED: set[str] = set()


def _adamw_8bit(model, recipe, device) -> torch.optim.Optimizer:
    """bitsandbytes' 8-bit AdamW (block-wise quantized state; on CPU too from bitsandbytes 0.50).

    Falls back to torch's AdamW, with one warning, where bitsandbytes cannot be imported or has no
    kernel for the device."""
    try:
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(param_groups(model, recipe), lr=recipe.lr, betas=recipe.betas,
                                  eps=recipe.eps)
        _probe_8bit(bnb, device)
        return opt
    except Exception as e:  # ImportError, or a missing native kernel (RuntimeError / NotImplementedError)
        if "adamw_8bit" not in _WARNED:
            _WARNED.add("adamw_8bit")
            warnings.warn(f"optimizer adamw_8bit: bitsandbytes is unavailable on {device} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); using torch.optim.AdamW instead", stacklevel=2)
        return _adamw(model, recipe, device)


def _probe_8bit(bnb, device) -> None:
    """One 8-bit step on a scratch tensor of the device, so a missing kernel shows up now, not mid-run."""
    p = nn.Parameter(torch.zeros(4096, device=device))
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()


def _muon(model, recipe, device) -> torch.optim.Optimizer:
    """Muon (torch.optim.Muon, Newton-Schulz orthogonalized momentum at AdamW-matched update RMS) for
    the hidden matrices, AdamW for the embedding, the head, norms and biases (qovaryx_model.muon;
    docs/MODEL.md has the measurements). Not with FSDP: its state is two optimizers'."""
    from ..muon import MuonAdamW

    return MuonAdamW(param_groups(model, recipe), betas=recipe.betas)


# name -> builder(model, recipe, device). A new optimizer is one entry here.
OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "adamw_8bit": _adamw_8bit, "muon": _muon}


def build_optimizer(model: nn.Module, recipe, device: torch.device) -> torch.optim.Optimizer:
    return OPTIMIZERS[recipe.optimizer](model, recipe, device)


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps (step 0 gets lr / warmup), then cosine from lr to min_lr at
    the last step `total - 1`. `step` is 0-based."""
    warmup = min(warmup, max(total - 1, 0))
    if step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


class Schedule:
    """The LR schedule as a stateful component: sets every group's lr for a step (each group keeps
    its own peak, `initial_lr`, so optimizers with per-group rates scale them together)."""

    def __init__(self, optimizer: torch.optim.Optimizer, recipe):
        self.optimizer, self.recipe = optimizer, recipe
        self.step = 0
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])

    def apply(self, step: int) -> float:
        """Set the lr of optimizer step `step`; returns the factor relative to the peak."""
        r = self.recipe
        factor = lr_at(step, r.lr, r.min_lr, r.warmup_steps, r.total_steps) / r.lr
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * factor
        self.step = step
        return factor

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (what 8-bit AdamW shrinks)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
