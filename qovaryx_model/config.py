"""QovaryxConfig: the model card's fields as a transformers config, plus named presets.

The field names are the card's (`d_model`, `n_layer`, ...); `attribute_map` exposes them under
transformers' standard names (`hidden_size`, `num_hidden_layers`, ...) so that `generate`, its
caches and other HF tooling work unchanged.

    >>> cfg = QovaryxConfig.from_preset("debug", mtp_k=1)
    >>> cfg.num_hidden_layers == cfg.n_layer
    True

This file is copied verbatim into every exported model folder: it imports only torch-free
standard library code and `transformers`.
"""
from __future__ import annotations

import math

from transformers import PreTrainedConfig

# Version of the checkpoint layout (config fields + weight names) this code reads and writes.
# A new major version means old folders need their own bundled code (trust_remote_code=True).
CHECKPOINT_FORMAT_VERSION = "1.0"

FFN_KINDS = ("swiglu", "ternary_swiglu", "lowrank_swiglu", "routed_lowrank_swiglu")
ATTN_BACKENDS = ("sdpa", "flash")
CALIBRATION_KINDS = ("none", "brier")
INITIALIZERS = ("xavier", "normal")
RESIDUAL_INITS = ("none", "scaled", "zero")

# Presets are named data. Shapes follow the model card (d_model, n_layer, n_head, n_kv_head, d_ff);
# every preset also carries LEARNING_DEFAULTS (measured in benchmarks/bench_learning.py, docs/MODEL.md);
# everything else keeps the config defaults (untied head, MTP-K=4). See docs/MODEL.md for counts.
LEARNING_DEFAULTS = dict(initializer="normal", initializer_range=0.02, residual_init="scaled")
PRESETS: dict[str, dict] = {
    # Tiny, for tests and smoke runs: 2 layers, GQA 4:2, head_dim 16.
    "debug": dict(d_model=64, n_layer=2, n_head=4, n_kv_head=2, d_ff=176, max_seq_len=256, ffn_rank=16,
                  image_size=28, patch_size=7, **LEARNING_DEFAULTS),
    "50m": dict(d_model=512, n_layer=12, n_head=8, n_kv_head=2, d_ff=1408, max_seq_len=4096, ffn_rank=64,
                **LEARNING_DEFAULTS),
    "350m": dict(d_model=1024, n_layer=24, n_head=16, n_kv_head=4, d_ff=2816, max_seq_len=4096, ffn_rank=128,
                 **LEARNING_DEFAULTS),
    "1b": dict(d_model=2048, n_layer=22, n_head=16, n_kv_head=4, d_ff=5504, max_seq_len=4096, ffn_rank=128,
               **LEARNING_DEFAULTS),
}


class QovaryxConfig(PreTrainedConfig):
    """Configuration of a Qovaryx decoder (a transformers config, `model_type="qovaryx"`)."""

    model_type = "qovaryx"
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "tie_word_embeddings": "tie_embeddings",
    }

    # --- trunk shape (defaults: the card's 350m) ---
    d_model: int = 1024  # residual width
    n_layer: int = 24  # transformer blocks in the trunk (MTP blocks are extra)
    n_head: int = 16  # query heads; head_dim = d_model // n_head
    n_kv_head: int = 4  # key/value heads (GQA): n_head must be a multiple
    d_ff: int = 2816  # SwiGLU hidden width (per expert width for the routed backend too)
    vocab_size: int = 20242  # the card's tokenizer; `qovaryx-train init` uses len(tokenizer)
    max_seq_len: int = 4096  # longest window the trainer will feed (RoPE has no hard limit)
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # untied head reproduces the card's 350m/1b counts
    attn_backend: str = "sdpa"  # "flash": flash-attn 2 on CUDA when installed, else SDPA

    # --- FFN backend (a registry key in ffn.py) ---
    ffn_kind: str = "swiglu"  # swiglu | ternary_swiglu | lowrank_swiglu | routed_lowrank_swiglu
    ffn_rank: int = 128  # rank of each factorized projection (lowrank / routed backends)
    ffn_experts: int = 4  # routed backend: number of low-rank experts
    ffn_top_k: int = 1  # routed backend: experts per token
    moe_aux_weight: float = 0.01  # weight of the load-balancing loss (mean over layers)
    moe_z_weight: float = 0.001  # weight of the router z-loss (mean over layers)

    # --- multi-token prediction (DeepSeek-V3 style) ---
    mtp_k: int = 4  # tokens predicted per position: main head + (mtp_k - 1) MTP depths
    mtp_weight: float = 0.3  # loss = main + mtp_weight * mean(depth losses)

    # --- decision head ---
    decision_head_enabled: bool = False  # 4-class head pooled at a chosen text position
    decision_num_classes: int = 4  # the card fixes 4 classes
    decision_weight: float = 0.5  # weight of the decision loss in the total loss
    decision_class_weights: list[float] | None = None  # CE class weights (card: class_weighted_decision)
    decision_calibration: str = "brier"  # calibration term: "brier" or "none"
    calibration_loss_weight: float = 0.0  # weight of the calibration term (card example: 0.2)

    # --- chart-patch encoder ---
    chart_patch_encoder_enabled: bool = False  # strided Conv2d over raw pixels -> prefix embeddings
    image_size: int = 224  # square image side in pixels (the packer stores this size)
    image_channels: int = 3  # 1 for grayscale, 3 for RGB
    patch_size: int = 16  # conv kernel = stride; prefix length = (image_size // patch_size) ** 2

    # --- special tokens (docs/CONTRACTS.md) and generation ---
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    pad_token_id: int | None = 1
    use_cache: bool = True
    initializer_gain: float = 1.0  # Xavier gain for Linear/Conv/Embedding (see docs/MODEL.md)
    # --- initialization and learning-quality knobs (docs/MODEL.md "Initialization"; class defaults
    # are the card's behaviour so older config.json files load unchanged; PRESETS carry the new ones) ---
    initializer: str = "xavier"  # "xavier" (the card's Glorot) or "normal" (GPT-2: N(0, initializer_range))
    initializer_range: float = 0.02  # std of the "normal" initializer (HF's name)
    residual_init: str = "none"  # o_proj and FFN down_proj: "none" (as any Linear), "scaled" (x 1/sqrt(2 n_layer)), "zero"
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (OLMo-2 style)
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c) (Gemma-2 / modded-nanogpt); 0 = off
    format_version: str = CHECKPOINT_FORMAT_VERSION  # checkpoint layout version, written into config.json

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)  # sets HF aliases (hidden_size=...) through attribute_map first
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, value, fix: str) -> ValueError:
            return ValueError(f"QovaryxConfig.{field}={value!r} is invalid: {fix}")

        if str(self.format_version).split(".")[0] != CHECKPOINT_FORMAT_VERSION.split(".")[0]:
            raise bad("format_version", self.format_version,
                      f"this code reads format {CHECKPOINT_FORMAT_VERSION.split('.')[0]}.x; load the folder with its own "
                      "bundled code (trust_remote_code=True, without importing qovaryx_model) or re-export it")

        for name in ("d_model", "n_layer", "n_head", "n_kv_head", "d_ff", "vocab_size", "max_seq_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, getattr(self, name), "use a positive integer")
        if self.d_model % self.n_head:
            raise bad("n_head", self.n_head, f"d_model ({self.d_model}) must be divisible by n_head")
        if (self.d_model // self.n_head) % 2:
            raise bad("n_head", self.n_head, "head_dim = d_model // n_head must be even for RoPE")
        if self.n_head % self.n_kv_head:
            raise bad("n_kv_head", self.n_kv_head, f"n_head ({self.n_head}) must be a multiple of n_kv_head")
        if self.ffn_kind not in FFN_KINDS:
            raise bad("ffn_kind", self.ffn_kind, f"choose one of {FFN_KINDS}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise bad("attn_backend", self.attn_backend, f"choose one of {ATTN_BACKENDS}")
        if self.ffn_kind in ("lowrank_swiglu", "routed_lowrank_swiglu"):
            if not 1 <= self.ffn_rank <= min(self.d_model, self.d_ff):
                raise bad("ffn_rank", self.ffn_rank, f"use 1..min(d_model, d_ff)={min(self.d_model, self.d_ff)}")
        if self.ffn_kind == "routed_lowrank_swiglu":
            if self.ffn_experts < 2:
                raise bad("ffn_experts", self.ffn_experts, "a routed FFN needs at least 2 experts")
            if not 1 <= self.ffn_top_k <= self.ffn_experts:
                raise bad("ffn_top_k", self.ffn_top_k, f"use 1..ffn_experts ({self.ffn_experts})")
        if not isinstance(self.mtp_k, int) or self.mtp_k < 1:
            raise bad("mtp_k", self.mtp_k, "use 1 (next token only) or more (1 + number of MTP depths)")
        if self.mtp_k >= self.max_seq_len:
            raise bad("mtp_k", self.mtp_k, f"must be below max_seq_len ({self.max_seq_len})")
        if not (_finite(self.rope_theta) and self.rope_theta > 0):
            raise bad("rope_theta", self.rope_theta, "use a positive RoPE base (Llama: 10000)")
        if not (_finite(self.rms_norm_eps) and self.rms_norm_eps >= 0):
            raise bad("rms_norm_eps", self.rms_norm_eps, "use a small non-negative epsilon such as 1e-5")
        for name in ("mtp_weight", "moe_aux_weight", "moe_z_weight", "decision_weight", "calibration_loss_weight"):
            if not (_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise bad(name, getattr(self, name), "loss weights must be finite and >= 0")
        if self.decision_num_classes != 4:
            raise bad("decision_num_classes", self.decision_num_classes, "the card's decision head has 4 classes")
        if self.decision_class_weights is not None:
            w = list(self.decision_class_weights)
            if len(w) != self.decision_num_classes or not all(_finite(x) and x >= 0 for x in w):
                raise bad("decision_class_weights", w, f"give {self.decision_num_classes} non-negative weights or None")
        if self.decision_calibration not in CALIBRATION_KINDS:
            raise bad("decision_calibration", self.decision_calibration, f"choose one of {CALIBRATION_KINDS}")
        if self.chart_patch_encoder_enabled:
            if self.image_channels not in (1, 3, 4):
                raise bad("image_channels", self.image_channels, "use 1 (grey), 3 (RGB) or 4 (RGBA)")
            if self.patch_size < 1 or self.image_size % self.patch_size:
                raise bad("patch_size", self.patch_size, f"must divide image_size ({self.image_size})")
        if self.initializer not in INITIALIZERS:
            raise bad("initializer", self.initializer, f"choose one of {INITIALIZERS}")
        if self.residual_init not in RESIDUAL_INITS:
            raise bad("residual_init", self.residual_init, f"choose one of {RESIDUAL_INITS}")
        if not self.initializer_range > 0:
            raise bad("initializer_range", self.initializer_range, "use a positive standard deviation (GPT-2: 0.02)")
        if not (_finite(self.logit_softcap) and self.logit_softcap >= 0):
            raise bad("logit_softcap", self.logit_softcap, "use 0 (off) or a positive cap such as 30")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) else [value]
            if not ids or not all(t is None or (isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < self.vocab_size) for t in ids):
                raise bad(name, value,
                          f"use None or token ids in 0..{self.vocab_size - 1} (vocab_size={self.vocab_size})")

    # --- derived quantities ---
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def n_mtp_modules(self) -> int:
        """Number of extra MTP depths (each one transformer block): mtp_k - 1."""
        return self.mtp_k - 1

    @property
    def n_image_tokens(self) -> int:
        """Prefix length the chart-patch encoder adds for a row with an image."""
        return (self.image_size // self.patch_size) ** 2 if self.chart_patch_encoder_enabled else 0

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "QovaryxConfig":
        """A config from a named preset (`debug`, `50m`, `350m`, `1b`) with field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _finite(x) -> bool:
    """A real number that is neither NaN nor infinite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
