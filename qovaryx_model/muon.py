"""Optimizers for the decoder: parameter groups as the trainer sees them, AdamW, and Muon + AdamW.

Groups (by module, not by name): `matrix` = every >= 2-D weight of a Linear/Conv2d except the
output head (weight decay), `head` = an untied output head (weight decay, AdamW under Muon too),
`embedding` = token embeddings and learned position tables (no decay), `scalar` = 1-D parameters:
norms, biases (no decay). Each group dict carries `peak_lr`: a schedule sets
`group["lr"] = group["peak_lr"] * factor(step)` for every group.

`muon`: torch.optim.Muon (Newton-Schulz orthogonalized momentum, `adjust_lr_fn="match_rms_adamw"`,
so it takes AdamW's learning rate and weight decay) on the 2-D `matrix` group; AdamW on the rest.

    >>> from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
    >>> m = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", mtp_k=1, vocab_size=64, tie_embeddings=True))
    >>> opt = build_optimizer(m, "muon", lr=1e-3, weight_decay=0.1)
    >>> [g["group"] for g in opt.param_groups]
    ['matrix', 'embedding', 'scalar']
"""
from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
STATE_FORMAT = "qovaryx-muon-adamw"
STATE_VERSION = 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, embed_lr_mult: float = 1.0,
                 matrix_lr_mult: float = 1.0) -> list[dict]:
    """The model's parameters in the groups above (empty groups left out), each shared tensor once;
    the embedding and matrix groups' peak lr are `lr` times their multiplier."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    embed_ids = set()
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            embed_ids.add(id(mod.weight))
    for name, p in model.named_parameters():
        if name.endswith(".pos") or name.endswith("wpe.weight"):  # learned position tables
            embed_ids.add(id(p))
    head_id = id(head.weight) if head is not None else None
    groups = {"matrix": [], "head": [], "embedding": [], "scalar": []}
    for p in model.parameters():  # model.parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        if id(p) in embed_ids:
            groups["embedding"].append(p)
        elif id(p) == head_id:
            groups["head"].append(p)
        elif p.dim() >= 2:
            groups["matrix"].append(p)
        else:
            groups["scalar"].append(p)
    spec = {"matrix": (lr * matrix_lr_mult, weight_decay), "head": (lr, weight_decay), "embedding": (lr * embed_lr_mult, 0.0),
            "scalar": (lr, 0.0)}
    return [{"params": ps, "group": g, "lr": spec[g][0], "peak_lr": spec[g][0], "weight_decay": spec[g][1]}
            for g, ps in groups.items() if ps]


class MuonAdamW:
    """Muon for the 2-D `matrix` group, AdamW for the others, stepped together.

    `param_groups` lists both optimizers' groups (so a schedule can set every group's lr);
    `state_dict` is versioned and holds both states.
    """

    def __init__(self, groups: list[dict], betas=(0.9, 0.95), momentum: float = 0.95):
        muon = [g for g in groups if g["group"] == "matrix"]
        rest = [g for g in groups if g["group"] != "matrix"]
        for g in muon:
            bad = [tuple(p.shape) for p in g["params"] if p.dim() != 2]
            if bad:
                raise ValueError(f"Muon takes 2-D matrices only; got parameters of shape {bad[:3]} in the matrix "
                                 "group (a Conv2d patch encoder: train it with optimizer 'adamw')")
        self.muon = torch.optim.Muon(muon, momentum=momentum, adjust_lr_fn="match_rms_adamw") if muon else None
        self.adamw = torch.optim.AdamW(rest, betas=betas) if rest else None
        self.optimizers = [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": STATE_VERSION,
                "muon": self.muon.state_dict() if self.muon else None,
                "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"optimizer state has format {state.get('format')!r} version {state.get('version')!r}; "
                             f"expected {STATE_FORMAT!r} version {STATE_VERSION} (was it saved by another optimizer?)")
        for key, o in (("muon", self.muon), ("adamw", self.adamw)):
            if (o is None) != (state[key] is None):
                raise ValueError(f"optimizer state's {key!r} part does not match this model's parameter groups")
            if o is not None:
                o.load_state_dict(state[key])


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    embed_lr_mult: float = 1.0, matrix_lr_mult: float = 1.0):
    """`adamw` (torch.optim.AdamW over the groups) or `muon` (MuonAdamW)."""
    groups = param_groups(model, lr, weight_decay, embed_lr_mult, matrix_lr_mult)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=betas)
    if name == "muon":
        return MuonAdamW(groups, betas=betas)
    raise ValueError(f"optimizer={name!r}: choose one of {OPTIMIZERS}")
