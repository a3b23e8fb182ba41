"""What a run reports: FLOPs per token and MFU, metrics.jsonl, the loss plot, TensorBoard.

FLOPs are counted as Megatron-LM counts them: 2 per multiply-add of every matmul weight a token
passes through (forward), times 3 for forward + backward, plus the attention score and value
products (2 * 2 * seq_len * d_attn per token and layer in the forward, the full square: SDPA's math
kernel computes it before masking). MTP depths are full blocks with their own projection and one
more pass through the vocabulary head each; routed FFNs count the top-k experts a token visits.

    >>> from qovaryx_model import QovaryxConfig
    >>> cfg = QovaryxConfig.from_preset("debug", mtp_k=1, vocab_size=1000)
    >>> f = flops_per_token(cfg, seq_len=128)
    >>> f == 6 * (2 * (4 * 64 * 64 - 2 * 64 * 32 + 3 * 64 * 176) + 64 * 1000) + 2 * 12 * 128 * 64
    True
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

# Dense bf16 peak throughput (FLOP/s, no sparsity) by a substring of torch.cuda.get_device_name().
# Override with the recipe key `peak_flops` or QOVARYX_PEAK_FLOPS. First match wins.
PEAK_BF16_FLOPS = [
    ("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12), ("B200", 2250e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
    ("RTX 5090", 209.5e12), ("RTX 5080", 112.6e12), ("RTX 5070 Ti", 87.9e12), ("RTX 4090", 165.2e12),
    ("RTX 4080", 97.5e12), ("RTX 3090", 71e12),
]


def matmul_params_per_token(cfg) -> int:
    """Weights of the matmuls one token passes through in the forward (trunk, MTP depths, heads)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2  # q, o; k, v
    if cfg.ffn_kind in ("swiglu", "ternary_swiglu"):
        ffn = 3 * d * cfg.d_ff
    elif cfg.ffn_kind == "lowrank_swiglu":
        ffn = 3 * cfg.ffn_rank * (d + cfg.d_ff)
    else:  # routed: the router, and top_k low-rank experts per token
        ffn = d * cfg.ffn_experts + cfg.ffn_top_k * 3 * cfg.ffn_rank * (d + cfg.d_ff)
    block = attn + ffn
    head = d * cfg.vocab_size
    mtp = cfg.n_mtp_modules * (block + 2 * d * d + head)
    return cfg.n_layer * block + head + mtp


def flops_per_token(cfg, seq_len: int) -> int:
    """Training FLOPs per input token at `seq_len` (see the module docstring)."""
    layers = cfg.n_layer + cfg.n_mtp_modules
    return 6 * matmul_params_per_token(cfg) + 2 * 3 * 2 * seq_len * cfg.n_head * cfg.head_dim * layers


def peak_flops(device, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (None on CPU or an unknown GPU, unless overridden)."""
    if override:
        return float(override)
    env = os.environ.get("QOVARYX_PEAK_FLOPS")
    if env:
        return float(env)
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS:
        if key in name:
            return value
    return None


class MetricsLog:
    """metrics.jsonl (one JSON object per line, appended and flushed per step), optional TensorBoard,
    and loss.png. On --resume, lines past the resumed step are dropped first, so the file reads as one run."""

    def __init__(self, out: Path, resume_step: int | None, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(out) / "metrics.jsonl"
        self.png = Path(out) / "loss.png"
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(k + "\n" for k in keep))
            os.replace(tmp, self.path)
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
            except ImportError:
                import warnings

                warnings.warn("tensorboard: true, but tensorboard is not installed (pip install tensorboard)")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(("val/" if row.get("eval") else "train/") + k, v, row["step"])

    def rows(self) -> list[dict]:
        return [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()] if self.path.exists() else []

    def plot(self) -> Path | None:
        """loss.png: training loss (and its moving average) and validation loss against tokens."""
        if not self.enabled:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.rows()
        train = [r for r in rows if not r.get("eval")]
        val = [r for r in rows if r.get("eval")]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        x = [r["tokens"] for r in train]
        y = [r["lm_loss"] for r in train]
        ax.plot(x, y, color="#9ab", lw=0.8, label="train next-token loss")
        k = max(1, len(y) // 25)
        if k > 1:
            avg = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            ax.plot(x, avg, color="#258", lw=1.6, label=f"train (mean of {k})")
        if val:
            ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", color="#c40", label="validation")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_name(".loss.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png)
        return self.png

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            if self.tb is not None:
                self.tb.close()


class Throughput:
    """Tokens/s over the last steps, and the share of wall time spent waiting for data."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.wait = 0.0

    def lap(self) -> float:
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt


def fmt_tokens(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def bits_per_byte(nats: float, tokens: int, nbytes: int) -> float:
    return nats * tokens / math.log(2) / max(nbytes, 1)
