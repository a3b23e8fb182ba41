"""The Qovaryx decoder: pre-norm RMSNorm, RoPE, GQA attention (SDPA or flash-attn 2, in attention.py), pluggable
FFN, DeepSeek-V3 multi-token prediction, an optional decision head and chart-patch prefix.

Shapes: B batch, T text tokens, N image-prefix tokens, S = N + T, H query heads, KV key/value
heads, hd head_dim, d d_model, V vocab. This file, attention.py, config.py, ffn.py and heads.py are copied into
every exported model folder, so they import only torch, transformers and each other.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

from .attention import AttnMask, Attention, build_mask, positions_for, prepared_mask, rope_cos_sin
from .config import QovaryxConfig
from .ffn import build_ffn
from .heads import DecisionHead, MTPDepth, PatchEncoder

IGNORE = -100
# Keyword arguments transformers' generate()/Trainer/tokenizers may pass that carry nothing we use
# (token_type_ids: a single segment type; the rest: output-format switches and cache bookkeeping).
HF_NOOP_KWARGS = {"return_dict", "output_attentions", "token_type_ids", "cache_position"}


class QovaryxBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: QovaryxConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.mlp = build_ffn(config)

    def forward(self, x, rope, mask: AttnMask, cache=None, token_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)  # (B, S, d)
        y, aux = self.mlp(self.post_attention_layernorm(x), token_mask)
        return x + y, aux


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
@dataclass
class QovaryxCausalLMOutput(ModelOutput):
    """`loss` is the total the optimizer sees; every term is also returned on its own."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (B, T, V) text positions only (no image prefix)
    cache: Cache | None = None
    lm_loss: torch.Tensor | None = None  # main next-token cross-entropy
    mtp_loss: torch.Tensor | None = None  # mean over MTP depths (unweighted)
    mtp_losses: torch.Tensor | None = None  # (mtp_k - 1,) per depth
    moe_aux_loss: torch.Tensor | None = None  # load balancing, mean over layers (unweighted)
    moe_z_loss: torch.Tensor | None = None  # router z-loss, mean over layers (unweighted)
    expert_load: torch.Tensor | None = None  # (n_layer, ffn_experts) fraction of routed slots
    decision_loss: torch.Tensor | None = None  # CE (+ calibration_loss_weight x calibration_loss), unweighted
    calibration_loss: torch.Tensor | None = None  # the Brier score inside decision_loss (before its weight)
    decision_logits: torch.Tensor | None = None  # (B, 4)
    decision_probs: torch.Tensor | None = None  # (B, 4)
    # transformers' convention, when asked (output_hidden_states): n_layer + 1 states (B, S, d), prefix
    # included: the embedding output, then each block's, the last one after the final norm
    hidden_states: tuple[torch.Tensor, ...] | None = None


@dataclass
class Trunk:
    """What the trunk hands to the heads."""

    h: torch.Tensor  # (B, S, d) residual stream after the last block (pre final norm)
    rope: tuple  # cos, sin (B, 1, S, hd)
    mask: AttnMask
    n_prefix: int  # N, image-prefix tokens at the start of every row (0 without images)
    docs: torch.Tensor | None  # (B, T) document ids of the text tokens
    router: list  # per-layer router stats (routed FFN only)
    cache: Cache | None
    token_mask: torch.Tensor | None = None  # (B, S) real tokens (None: all are)
    states: list | None = None  # (B, S, d) embedding output and each block's, when asked

    def hidden_states(self, normed: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """transformers' `hidden_states`: the states, the last one replaced by `normed` (the final norm's)."""
        return None if self.states is None else (*self.states[:-1], normed)


class QovaryxPreTrainedModel(PreTrainedModel):
    config_class = QovaryxConfig
    config: QovaryxConfig
    base_model_prefix = "model"
    _no_split_modules = ["QovaryxBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    supports_gradient_checkpointing = True

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; `auto_map` also names AutoModel (transformers adds only the
        saved class's own Auto class), so any Qovaryx folder loads with either Auto class. A model
        restored from a packed ternary file is refused: its BitLinear weights are codes."""
        if any(getattr(m, "weight_scale", None) is not None for m in self.modules()):
            raise ValueError("this model was restored from a packed ternary file (its BitLinear weights are codes "
                             "with fixed scales): write it with hf.export_ternary_packed, or save the float "
                             "checkpoint it was exported from")
        if self.is_remote_code():  # registered (qovaryx_model imported) or loaded with trust_remote_code
            module = QovaryxModel.__module__.split(".")[-1]
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": f"{module}.QovaryxModel"}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """`initializer="xavier"` (the card): Glorot uniform for Linear and Conv2d (gain
        `initializer_gain`), Xavier normal for the embedding. `"normal"` (GPT-2): N(0, initializer_range)
        for both. Either way biases 0, norms 1, patch position embeddings N(0, 0.02). A low-rank pair
        B·A under "normal" has A ~ N(0, range) and B ~ N(0, 1/sqrt(rank)), so B·A has std `range`
        like a dense weight. `residual_init` then scales ("scaled": 1/sqrt(2·n_layer), the trunk's
        n_layer) or zeroes the Linears marked `residual_out`, the ones that write into the residual
        stream: attention `o_proj` and the FFN `down_proj` (its B factor when low-rank, in every routed
        expert), in the trunk and the MTP depths alike. (transformers calls this on the modules that
        hold parameters themselves, so the marks sit on the Linears.)"""
        cfg = self.config
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            scale = self.residual_scale if getattr(module, "residual_out", False) else 1.0
            if scale == 0:
                init.zeros_(module.weight)
            elif cfg.initializer == "normal":
                lowrank_b = getattr(module, "lowrank_b", False)  # B of B·A: its input width is the rank
                std = scale / module.in_features ** 0.5 if lowrank_b else cfg.initializer_range * scale
                init.normal_(module.weight, std=std)
            else:
                init.xavier_uniform_(module.weight, gain=cfg.initializer_gain * scale)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            if cfg.initializer == "normal":
                init.normal_(module.weight, std=cfg.initializer_range)
            else:
                init.xavier_normal_(module.weight, gain=cfg.initializer_gain)
        elif isinstance(module, nn.RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, PatchEncoder):
            init.normal_(module.pos, std=0.02)

    @property
    def residual_scale(self) -> float:
        """Init factor of the residual output projections: 1 ("none"), 1/sqrt(2 * n_layer) or 0."""
        return {"none": 1.0, "scaled": (2 * self.config.n_layer) ** -0.5, "zero": 0.0}[self.config.residual_init]


class QovaryxModel(QovaryxPreTrainedModel):
    """Embedding (+ optional image prefix), the blocks, the final norm."""

    def __init__(self, config: QovaryxConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.patch_encoder = (PatchEncoder(config.image_channels, config.image_size, config.patch_size, config.d_model)
                              if config.chart_patch_encoder_enabled else None)
        self.layers = nn.ModuleList(QovaryxBlock(config, i) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.d_model, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False  # set by model.activation_checkpointing_enable()
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def run_block(self, block, x, rope, mask, cache=None, token_mask=None):
        """One block, recomputed in the backward when activation checkpointing is on (non-reentrant,
        so the router statistics returned beside x keep their gradient)."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, rope, mask, cache, token_mask, use_reentrant=False)
        return block(x, rope, mask, cache, token_mask)

    def trunk(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
              document_ids=None, pixel_values=None, image_mask=None, use_cache=False,
              output_hidden_states=False) -> Trunk:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T, _ = x.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = int(cache.get_seq_length()) if cache is not None else 0  # a static cache counts in a tensor
        if document_ids is not None and past:
            raise ValueError("document_ids cannot be combined with a KV cache: pass them for training forwards only")
        prepared = attention_mask is not None and attention_mask.dim() == 4  # transformers' own mask (static cache)
        if prepared and (pixel_values is not None or document_ids is not None):
            raise ValueError("a 4-D attention_mask cannot be combined with pixel_values or document_ids: "
                             "pass the 2-D (B, T) padding mask")
        valid = attention_mask.bool() if attention_mask is not None and not prepared else None  # (B, past + T)

        n_prefix = 0
        if pixel_values is not None:  # image prefix: (B, N, d) before the text, masked out for rows without one
            if self.patch_encoder is None:
                raise ValueError("pixel_values given but chart_patch_encoder_enabled=False in the model config")
            if cache is not None:
                raise ValueError("pixel_values cannot be used with a KV cache (generation with images is not supported)")
            prefix = self.patch_encoder(pixel_values).to(x.dtype)
            n_prefix = prefix.shape[1]
            has_img = (image_mask.bool() if image_mask is not None
                       else torch.ones(B, dtype=torch.bool, device=x.device))
            text_valid = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
            valid = torch.cat([has_img[:, None].expand(B, n_prefix), text_valid], dim=1)  # (B, S)
            x = torch.cat([prefix, x], dim=1)  # (B, S, d)

        docs = document_ids
        full_docs = None
        if docs is not None:  # the prefix belongs to the row's first document
            full_docs = torch.cat([docs[:, :1].expand(B, n_prefix), docs], dim=1)  # (B, S)
        S = x.shape[1]
        kv_len = cache.get_mask_sizes(S, 0)[0] if cache is not None else S  # a static cache: its whole length
        if document_ids is not None and kv_len != S:
            raise ValueError("document_ids cannot be combined with a static KV cache: pass them for training forwards only")
        if prepared:
            mask, token_mask, seen = prepared_mask(attention_mask, past, S, kv_len)
            position_ids = seen if position_ids is None else position_ids
        elif position_ids is None:
            if valid is None and full_docs is None:
                position_ids = (torch.arange(S, device=x.device) + past).expand(B, S)
            else:
                v = valid if valid is not None else torch.ones(B, S, dtype=torch.bool, device=x.device)
                position_ids = positions_for(v, full_docs)[:, -S:]
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)
        if not prepared:
            mask = build_mask(valid, full_docs, position_ids, S, past, kv_len)
            token_mask = valid[:, -S:] if valid is not None else None  # real tokens, for router statistics

        router = []
        states = [x] if output_hidden_states else None
        for block in self.layers:
            x, aux = self.run_block(block, x, rope, mask, cache, token_mask)
            if aux is not None:
                router.append(aux)
            if states is not None:
                states.append(x)
        return Trunk(x, rope, mask, n_prefix, docs, router, cache, token_mask, states)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, output_hidden_states=None, **kwargs):
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported (attention runs in SDPA / flash-attn kernels)")
        kwargs = {k: v for k, v in kwargs.items() if k not in HF_NOOP_KWARGS}  # switches transformers passes
        t = self.trunk(input_ids, attention_mask, position_ids, cache if cache is not None else past_key_values,
                       inputs_embeds, use_cache=bool(use_cache), output_hidden_states=bool(output_hidden_states),
                       **kwargs)
        h = self.norm(t.h)
        return BaseModelOutputWithPast(last_hidden_state=h, cache=t.cache, hidden_states=t.hidden_states(h))


class QovaryxForCausalLM(QovaryxPreTrainedModel, GenerationMixin):
    """The causal LM with MTP depths and optional heads. `FinanceDecoder` is its legacy alias."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: QovaryxConfig):
        super().__init__(config)
        self.model = QovaryxModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(
            MTPDepth(config.d_model, config.rms_norm_eps, QovaryxBlock(config, config.n_layer + k))
            for k in range(config.n_mtp_modules)
        )
        self.decision_head = DecisionHead(config.d_model, config.decision_num_classes) \
            if config.decision_head_enabled else None
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head, soft-capped to (-c, c) by c * tanh(logits / c) when logit_softcap = c > 0."""
        logits = self.lm_head(h)
        c = self.config.logit_softcap
        return c * torch.tanh(logits / c) if c else logits

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, past + T) during generation
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,  # (B, T), unshifted, -100 = no loss
        use_cache: bool | None = None,
        document_ids: torch.LongTensor | None = None,  # (B, T)
        pixel_values: torch.Tensor | None = None,  # (B, C, H, W) uint8
        image_mask: torch.Tensor | None = None,  # (B,) bool
        decision_labels: torch.LongTensor | None = None,  # (B,), -100 = unlabeled
        decision_positions: torch.LongTensor | None = None,  # (B,) index among the row's real text tokens
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,  # transformers < 5.x name of `cache`
        num_items_in_batch=None,  # step-wide target counts: HF's int/tensor, or a `loss_counts` dict
        output_hidden_states: bool | None = None,  # None: config.output_hidden_states
        **kwargs,
    ) -> QovaryxCausalLMOutput:
        cfg = self.config
        unknown = set(kwargs) - HF_NOOP_KWARGS
        if unknown:  # a misspelt batch key must not be dropped silently
            raise TypeError(f"QovaryxForCausalLM.forward got unexpected inputs {sorted(unknown)}")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported (attention runs in SDPA / flash-attn kernels)")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = cfg.use_cache and labels is None and pixel_values is None and not self.training
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        t = self.model.trunk(input_ids, attention_mask, position_ids, cache, inputs_embeds, document_ids,
                             pixel_values, image_mask, use_cache, bool(output_hidden_states))
        hidden = self.model.norm(t.h)  # (B, S, d)
        text = hidden[:, t.n_prefix:]  # (B, T, d): no LM loss or logits on the image prefix
        out = QovaryxCausalLMOutput(cache=t.cache if use_cache else None, hidden_states=t.hidden_states(hidden))
        T = text.shape[1]
        real = t.token_mask[:, t.n_prefix:] if t.token_mask is not None else None  # (B, T) real text tokens
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = real  # the losses read the 2-D padding mask

        keep = text[:, -logits_to_keep:] if (logits_to_keep and labels is None) else text
        out.logits = self.head_logits(keep)  # (B, T or logits_to_keep, V)

        terms = []  # (weight, loss) that make up out.loss
        norm = _Normalizer(num_items_in_batch)
        if labels is not None:
            targets = self._loss_targets(labels, attention_mask, document_ids, T)  # [lm, depth 1, ...]
            total, count = self._ce_sum(out.logits, targets[0])
            norm.lm_local = count
            out.lm_loss = norm(total, count, "lm")
            terms.append((1.0, out.lm_loss))
            if len(targets) > 1:
                losses = self._mtp_losses(t, input_ids, targets[1:], norm)
                out.mtp_losses = torch.stack(losses)  # (K-1,), exactly 0 for a depth without any valid target
                # mean over the depths with targets (not e.g. documents shorter than k + 2); the others add 0
                with_targets = norm.mtp_depths_with_targets(targets[1:])
                out.mtp_loss = out.mtp_losses.sum() / with_targets.clamp(min=1)
                terms.append((cfg.mtp_weight, out.mtp_loss))
            if t.router:  # per micro-batch means; `norm` turns them into a mean over the step's micro-batches
                out.moe_aux_loss = norm.per_batch(torch.stack([r["aux_loss"] for r in t.router]).mean())
                out.moe_z_loss = norm.per_batch(torch.stack([r["z_loss"] for r in t.router]).mean())
                terms += [(cfg.moe_aux_weight, out.moe_aux_loss), (cfg.moe_z_weight, out.moe_z_loss)]
        if t.router:
            out.expert_load = torch.stack([r["load"] for r in t.router])  # (n_layer, E)

        if self.decision_head is not None and (decision_positions is not None or decision_labels is not None):
            if decision_positions is None:
                raise ValueError("decision_labels given without decision_positions (index of the pooled text token)")
            n = real.sum(1) if real is not None else torch.full_like(decision_positions, T)  # real text tokens per row
            if bool(((decision_positions < 0) | (decision_positions >= n.clamp(min=1))).any()):
                raise ValueError(f"decision_positions must index each row's real text tokens (0..n-1, counted where "
                                 f"attention_mask is 1; n = {n.tolist()}); got {decision_positions.tolist()}")
            out.decision_logits = self.decision_head(text, decision_positions, real)  # (B, C) float32
            out.decision_probs = out.decision_logits.softmax(-1)
            if decision_labels is not None:
                out.decision_loss, out.calibration_loss = self._decision_loss(
                    out.decision_logits, out.decision_probs, decision_labels, norm)
                terms.append((cfg.decision_weight, out.decision_loss))
        elif decision_labels is not None:
            raise ValueError("decision_labels given but decision_head_enabled=False in the model config")

        if terms:
            out.loss = sum(w * l for w, l in terms)
        return out

    # --- losses -----------------------------------------------------------------------------
    # Every term is a sum over its targets divided by a count: by default the micro-batch's own count
    # (a mean), or the whole optimizer step's count when the caller passes `num_items_in_batch`
    # (see `_Normalizer`), so that summing the micro-batches' losses gives the step's exact mean.
    @staticmethod
    def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed token cross-entropy in float32 over the valid targets, and their count (tensors:
        no host sync; the sum is exactly 0, with a graph, when there is no target)."""
        total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        return total, (targets != IGNORE).sum()

    @staticmethod
    def _targets(labels: torch.Tensor, docs: torch.Tensor | None, ahead: int) -> torch.Tensor:
        """Target of each position for predicting `ahead` tokens past it: labels[:, i + ahead], ignored
        when it lies in another document or past the window end. (B, T) -> (B, T).

        Kept full length so the logits are never sliced (a slice would cost a (B, T, V) zero-fill
        and copy in the backward).
        """
        tgt = torch.full_like(labels, IGNORE)
        tgt[:, :-ahead] = labels[:, ahead:]
        if docs is not None:
            tgt[:, :-ahead].masked_fill_(docs[:, ahead:] != docs[:, :-ahead], IGNORE)
        return tgt

    def _loss_targets(self, labels, attention_mask, document_ids, T: int) -> list[torch.Tensor]:
        """The targets of every next-token term: [main head (B, T), MTP depth 1 (B, T - 1), ...].

        Padding is never a target, even when labels carry a token there (the card's loop passes
        labels=input_ids): attention_mask 0 or document id -1 (docs/CONTRACTS.md). Depth k has
        T - k positions and exists only while that is at least 2 (and T > 2)."""
        if attention_mask is not None and attention_mask.shape[1] == T:
            labels = labels.masked_fill(attention_mask == 0, IGNORE)
        if document_ids is not None:
            labels = labels.masked_fill(document_ids < 0, IGNORE)
        out = [self._targets(labels, document_ids, 1)]
        if T > 2:
            for k in range(1, self.config.n_mtp_modules + 1):
                if T - k < 2:
                    break
                out.append(self._targets(labels, document_ids, k + 1)[:, :T - k])  # last position: past the end
        return out

    @torch.no_grad()
    def loss_counts(self, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    document_ids: torch.Tensor | None = None, decision_labels: torch.Tensor | None = None,
                    **_ignored) -> dict[str, torch.Tensor]:
        """The target counts of one micro-batch, as the forward counts them: `lm` (next-token targets,
        which equals HF's count of `labels[..., 1:] != -100` when labels are -100 at each document's
        first token), `mtp` (K-1,) per depth, `decision` (the labelled rows' class-weight sum) and
        `decision_rows`, plus `micro_batches` = 1. Sum them over every micro-batch (and rank) of an
        optimizer step and pass the sums as `num_items_in_batch` to each forward of the step: then
        the micro-batches' losses add up to the step's exact per-target means.

            >>> m = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", mtp_k=2, vocab_size=64))
            >>> c = m.loss_counts(torch.tensor([[-100, 9, 10, 11]]))     # 3 targets; depth 1: 2
            >>> int(c["lm"]), c["mtp"].tolist()
            (3, [2])
        """
        T = labels.shape[1]
        targets = self._loss_targets(labels, attention_mask, document_ids, T)
        mtp = torch.zeros(self.config.n_mtp_modules, dtype=torch.long, device=labels.device)
        for k, tgt in enumerate(targets[1:]):
            mtp[k] = (tgt != IGNORE).sum()
        counts = {"lm": (targets[0] != IGNORE).sum(), "mtp": mtp,
                  "micro_batches": torch.ones((), dtype=torch.long, device=labels.device)}
        if decision_labels is not None:
            has = decision_labels != IGNORE
            w = self._decision_weights(decision_labels.device)
            counts["decision"] = (w[decision_labels[has]].sum() if w is not None else has.sum().float())
            counts["decision_rows"] = has.sum()
        return counts

    def _mtp_losses(self, t: Trunk, input_ids: torch.Tensor, targets: list[torch.Tensor], norm: "_Normalizer"):
        """DeepSeek-V3 MTP: depth k (1..K-1) at position i sees h^{k-1}_i and emb(t_{i+k}) and
        predicts t_{i+k+1}; sequences shrink by one per depth, so targets never pass the window end."""
        if input_ids is None:
            raise ValueError("MTP losses need input_ids (the embedding of the tokens ahead)")
        T = input_ids.shape[1]
        h = t.h[:, t.n_prefix:]  # (B, T, d) text part of the trunk's residual stream
        cos, sin = t.rope
        losses = []
        for k, (depth, tgt) in enumerate(zip(self.mtp, targets), start=1):
            L = T - k  # positions 0..L-1 have a token k ahead
            x = depth.combine(h[:, :L], self.model.embed_tokens(input_ids[:, k:]))  # (B, L, d)
            rope = (cos[:, :, t.n_prefix:t.n_prefix + L], sin[:, :, t.n_prefix:t.n_prefix + L])
            mask = t.mask.truncate(t.n_prefix, L)
            assert mask.dense is not None or mask.is_causal, "build_mask masks every forward of more than one token"
            h, _ = self.model.run_block(depth.block, x, rope, mask)  # (B, L, d); MTP router stats unused
            logits = self.head_logits(depth.norm(h))  # (B, L, V): position i predicts t_{i+k+1}
            total, count = self._ce_sum(logits, tgt)
            losses.append(norm(total, count, "mtp", k - 1))
        return losses

    def _decision_weights(self, device) -> torch.Tensor | None:
        w = self.config.decision_class_weights
        return torch.tensor(w, dtype=torch.float32, device=device) if w is not None else None

    def _decision_loss(self, logits, probs, labels, norm: "_Normalizer") -> tuple[torch.Tensor, torch.Tensor | None]:
        """(Class-weighted) cross-entropy over the labelled rows, plus the calibration term: the
        multi-class Brier score, a mean over the labelled rows. Returns (loss, Brier term or None)."""
        cfg = self.config
        has = labels != IGNORE
        weight = self._decision_weights(logits.device)
        ce = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # (B,), 0 where unlabelled
        w = weight[labels.clamp(min=0)] * has if weight is not None else has.float()
        loss = norm((ce * w).sum(), w.sum(), "decision")
        if cfg.decision_calibration == "brier" and cfg.calibration_loss_weight > 0:
            onehot = F.one_hot(labels.clamp(min=0), cfg.decision_num_classes).float()
            brier = (probs - onehot).square().sum(-1) * has  # multi-class Brier score per row, in [0, 2]
            calibration = norm(brier.sum(), has.sum(), "decision_rows")
            return loss + cfg.calibration_loss_weight * calibration, calibration
        return loss, None


class _Normalizer:
    """Divides a loss term's sum by its count (see `QovaryxForCausalLM.loss_counts`).

    `counts` None: the micro-batch's own count (a mean over this batch). A dict: the optimizer step's
    count of that term (token-exact accumulation; DDP callers also multiply the loss by the world
    size, since DDP averages gradients). An int or 0-d tensor (transformers' `num_items_in_batch`,
    the step's next-token target count): the next-token term is divided by it, and every other
    term's batch mean is scaled by this batch's share of the step's next-token targets, so the
    micro-batches' terms still add up to a step-wide mean.
    """

    def __init__(self, counts):
        self.counts = counts
        self.lm_local: torch.Tensor | None = None

    def _share(self) -> torch.Tensor:
        return self.lm_local / torch.as_tensor(self.counts, device=self.lm_local.device).clamp(min=1)

    def __call__(self, total: torch.Tensor, count: torch.Tensor, key: str, index: int | None = None):
        if self.counts is None:
            return total / count.clamp(min=1)
        if isinstance(self.counts, dict):
            c = self.counts[key] if index is None else self.counts[key][index]
            return total / torch.as_tensor(c, device=total.device).clamp(min=1)
        if key == "lm":
            return total / torch.as_tensor(self.counts, device=total.device).clamp(min=1)
        return total / count.clamp(min=1) * self._share()

    def per_batch(self, value: torch.Tensor) -> torch.Tensor:
        """A per-micro-batch mean (MoE auxiliary terms) as this batch's part of the step's mean."""
        if self.counts is None:
            return value
        if isinstance(self.counts, dict):
            return value / torch.as_tensor(self.counts["micro_batches"], device=value.device).clamp(min=1)
        return value * self._share()

    def mtp_depths_with_targets(self, targets: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.counts, dict):
            return (torch.as_tensor(self.counts["mtp"]) > 0).sum()
        return torch.stack([(t != IGNORE).any() for t in targets]).sum()  # a tensor: no host sync


FinanceDecoder = QovaryxForCausalLM  # the card's legacy class name


def parameter_counts(config: QovaryxConfig) -> dict[str, int]:
    """Parameter counts by part, built on the meta device (no weights are allocated)."""
    with torch.device("meta"):
        model = QovaryxForCausalLM(config)
    seen: set[int] = set()

    def count(module: nn.Module | None) -> int:
        if module is None:
            return 0
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    parts = {
        "embedding": count(model.model.embed_tokens),
        "trunk_blocks": count(model.model.layers),
        "final_norm": count(model.model.norm),
        "lm_head": count(model.lm_head),  # 0 when tied (shared with the embedding)
        "mtp_modules": count(model.mtp),
        "decision_head": count(model.decision_head),
        "patch_encoder": count(model.model.patch_encoder),
    }
    parts["total"] = sum(parts.values())
    assert parts["total"] == sum(p.numel() for p in model.parameters()), "every parameter belongs to one part"
    return parts


__all__ = ["QovaryxForCausalLM", "QovaryxModel", "QovaryxPreTrainedModel", "FinanceDecoder", "parameter_counts",
           "QovaryxCausalLMOutput"]
