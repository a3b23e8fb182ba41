"""qovaryx_model: config, presets and parameter counts, the decoder, FFN backends, MTP, heads."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qovaryx_model import FinanceDecoder, QovaryxConfig, QovaryxForCausalLM, parameter_counts
from qovaryx_model.ffn import (BitLinear, RoutedLowRankSwiGLU, pack_ternary, quantize_activations,
                               ternary_quantize, unpack_ternary)
from qovaryx_model.hf import export_ternary_packed, load_ternary_packed
from qovaryx_model.attention import AttnMask, Attention, apply_rope, positions_for, rope_cos_sin

FFN_KINDS = ["swiglu", "ternary_swiglu", "lowrank_swiglu", "routed_lowrank_swiglu"]
V = 512  # small vocab keeps the debug model quick


def debug(**kw) -> QovaryxConfig:
    return QovaryxConfig.from_preset("debug", vocab_size=V, **kw)


# ---------------------------------------------------------------------------------------------
# config, presets, parameter counts
# ---------------------------------------------------------------------------------------------
def expected_count(d, L, h, kv, ff, vocab=20242, tied=False, mtp_modules=3) -> int:
    """Independent arithmetic for a dense SwiGLU model (see docs/MODEL.md)."""
    hd = d // h
    attn = d * d + 2 * d * kv * hd + d * d  # q, k, v, o
    block = attn + 3 * d * ff + 2 * d  # + SwiGLU + two RMSNorms
    emb = vocab * d
    mtp = 2 * d * d + block + 3 * d  # proj 2d->d, one block, three norms
    return L * block + emb + (0 if tied else emb) + d + mtp_modules * mtp


@pytest.mark.parametrize("preset,shape", [
    ("50m", (512, 12, 8, 2, 1408)), ("350m", (1024, 24, 16, 4, 2816)), ("1b", (2048, 22, 16, 4, 5504))])
def test_preset_shapes_and_counts_on_meta(preset, shape):
    cfg = QovaryxConfig.from_preset(preset)
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.vocab_size) == (*shape, 20242)
    assert parameter_counts(cfg)["total"] == expected_count(*shape)


def test_card_figures_and_the_settings_that_reproduce_them():
    # 350m: the defaults (untied head, MTP-K=4 -> three MTP modules) give the card's ~352M
    assert parameter_counts(QovaryxConfig.from_preset("350m"))["total"] == 352_161_792
    # 1b: untied, no MTP modules gives ~1.05B (1.058B)
    assert parameter_counts(QovaryxConfig.from_preset("1b", mtp_k=1))["total"] == 1_057_654_784
    # 50m: nearest is a tied head with one MTP module (47.5M); the default settings give 64.6M
    assert parameter_counts(QovaryxConfig.from_preset("50m", tie_embeddings=True, mtp_k=2))["total"] == 47_538_176
    assert parameter_counts(QovaryxConfig.from_preset("50m"))["total"] == 64_591_872


def test_config_hf_names_and_round_trip():
    cfg = debug(ffn_kind="routed_lowrank_swiglu")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.tie_word_embeddings) == (64, 2, 4, 2, 176, False)
    assert QovaryxConfig(hidden_size=128, n_head=4).d_model == 128  # HF names are accepted as input too
    back = QovaryxConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 0, 1)


@pytest.mark.parametrize("kw,field", [
    (dict(n_kv_head=3), "n_kv_head"), (dict(n_head=5), "n_head"), (dict(ffn_kind="moe"), "ffn_kind"),
    (dict(ffn_kind="routed_lowrank_swiglu", ffn_top_k=5), "ffn_top_k"),
    (dict(ffn_kind="lowrank_swiglu", ffn_rank=0), "ffn_rank"), (dict(attn_backend="xformers"), "attn_backend"),
    (dict(chart_patch_encoder_enabled=True, patch_size=5), "patch_size"), (dict(mtp_k=0), "mtp_k"),
    (dict(decision_class_weights=[1.0, 2.0]), "decision_class_weights"), (dict(mtp_weight=-1.0), "mtp_weight"),
    (dict(format_version="2.0"), "format_version"),
])
def test_invalid_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"QovaryxConfig\.{field}="):
        debug(**kw)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        QovaryxConfig.from_preset("huge")


# ---------------------------------------------------------------------------------------------
# initialization (docs/MODEL.md): Xavier uniform for Linear/Conv2d, Xavier normal for the embedding
# ---------------------------------------------------------------------------------------------
def fans(module) -> tuple[int, int]:
    if isinstance(module, torch.nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return module.in_channels * k, module.out_channels * k
    return module.in_features, module.out_features


def xavier_uniform_misfits(model, gain: float) -> dict[str, str]:
    """Linear/Conv2d weights that do not look like U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)):
    std a / sqrt(3) within 4 standard errors (the std of n uniform draws has relative s.e. ~0.45/sqrt(n)),
    and max|w| in (0.9 a, a]."""
    bad = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in, fan_out = fans(m)
            w = m.weight.detach()
            a = gain * math.sqrt(6.0 / (fan_in + fan_out))
            rel = w.std().item() / (a / math.sqrt(3)) - 1
            peak = w.abs().max().item()
            if abs(rel) > 4 * 0.45 / math.sqrt(w.numel()) or not 0.9 * a < peak <= a * (1 + 1e-6):
                bad[name] = f"std off by {rel:+.1%}, max|w| = {peak / a:.2f} a"
    return bad


@pytest.mark.parametrize("gain", [1.0, 0.5])
def test_fresh_model_follows_the_documented_init(gain):
    torch.manual_seed(0)
    cfg = debug(initializer="xavier", residual_init="none", initializer_gain=gain, decision_head_enabled=True,
                chart_patch_encoder_enabled=True)  # the card's init (the presets use "normal": test_learning.py)
    model = QovaryxForCausalLM(cfg)
    names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert {"lm_head", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "mtp.0.proj",
            "decision_head.proj", "model.patch_encoder.conv"} <= names  # every kind of layer is checked
    assert xavier_uniform_misfits(model, gain) == {}
    assert (model.decision_head.proj.bias == 0).all() and (model.model.patch_encoder.conv.bias == 0).all()

    emb = model.model.embed_tokens.weight.detach()  # Xavier normal: N(0, gain^2 * 2 / (V + d))
    std = gain * math.sqrt(2.0 / (cfg.vocab_size + cfg.d_model))
    assert abs(emb.std().item() / std - 1) < 4 / math.sqrt(2 * emb.numel())  # s.e. of a normal's std
    assert abs(emb.mean().item()) < 4 * std / math.sqrt(emb.numel())
    assert emb.abs().max().item() > math.sqrt(3) * std * 1.5  # normal tails, not a uniform's bounded range
    pos = model.model.patch_encoder.pos.detach()  # N(0, 0.02)
    assert abs(pos.std().item() / 0.02 - 1) < 4 / math.sqrt(2 * pos.numel())
    norms = [m.weight for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * cfg.n_layer + 1 + 5 * (cfg.mtp_k - 1)  # 2 per block, final, 3 + 2 per MTP depth
    assert all(bool((w == 1).all()) for w in norms)

    if gain == 1.0:  # the check has teeth: PyTorch's default init (Kaiming uniform) fails it everywhere
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
                m.reset_parameters()
        assert set(xavier_uniform_misfits(model, gain)) == names
        assert abs(model.model.embed_tokens.weight.std().item() / std - 1) > 0.5  # N(0, 1)


# ---------------------------------------------------------------------------------------------
# forward / backward for every backend, heads on and off
# ---------------------------------------------------------------------------------------------
def full_batch(cfg: QovaryxConfig, B=2, T=24, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, cfg.vocab_size, (B, T), generator=g)
    docs = torch.zeros(B, T, dtype=torch.long)
    docs[0, 10:] = 1  # row 0 holds two documents
    batch = dict(input_ids=ids, labels=ids.clone(), document_ids=docs)
    if cfg.chart_patch_encoder_enabled:
        s = cfg.image_size
        batch["pixel_values"] = torch.randint(0, 256, (B, cfg.image_channels, s, s), generator=g, dtype=torch.uint8)
        batch["image_mask"] = torch.tensor([True, False])
    if cfg.decision_head_enabled:
        batch["decision_labels"] = torch.tensor([2, -100])
        batch["decision_positions"] = torch.tensor([T - 1, 5])
    return batch


@pytest.mark.parametrize("heads", [False, True], ids=["no-heads", "heads"])
@pytest.mark.parametrize("kind", FFN_KINDS)
def test_shapes_and_every_parameter_gets_gradient(kind, heads):
    torch.manual_seed(0)
    cfg = debug(ffn_kind=kind, decision_head_enabled=heads, chart_patch_encoder_enabled=heads, image_channels=1,
                calibration_loss_weight=0.2)
    model = QovaryxForCausalLM(cfg)
    batch = full_batch(cfg)
    out = model(**batch)
    B, T = batch["input_ids"].shape
    assert out.logits.shape == (B, T, V)  # text positions only, even with an image prefix
    assert out.mtp_losses.shape == (cfg.mtp_k - 1,)
    expected = out.lm_loss + cfg.mtp_weight * out.mtp_loss
    if kind == "routed_lowrank_swiglu":
        assert out.expert_load.shape == (cfg.n_layer, cfg.ffn_experts)
        torch.testing.assert_close(out.expert_load.sum(-1), torch.ones(cfg.n_layer))
        expected = expected + cfg.moe_aux_weight * out.moe_aux_loss + cfg.moe_z_weight * out.moe_z_loss
    if heads:
        assert out.decision_probs.shape == (B, 4)
        torch.testing.assert_close(out.decision_probs.sum(-1), torch.ones(B))
        expected = expected + cfg.decision_weight * out.decision_loss
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    if kind == "routed_lowrank_swiglu":  # an expert that got no token this batch has no gradient, by design
        dead = [n for n in dead if ".experts." not in n]
    assert dead == []
    if kind == "routed_lowrank_swiglu":
        assert all(model.model.layers[i].mlp.router.weight.grad.abs().sum() > 0 for i in range(cfg.n_layer))


def test_router_gets_gradient_from_task_loss_alone_with_top1():
    torch.manual_seed(0)
    cfg = debug(ffn_kind="routed_lowrank_swiglu", ffn_top_k=1, moe_aux_weight=0.0, moe_z_weight=0.0, mtp_k=1)
    model = QovaryxForCausalLM(cfg)
    ids = torch.randint(8, V, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_legacy_alias_and_hf_loss_convention():
    assert FinanceDecoder is QovaryxForCausalLM
    model = FinanceDecoder(debug(mtp_k=1))
    ids = torch.randint(8, V, (2, 12))
    out = model(input_ids=ids, labels=ids)
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    with pytest.raises(TypeError, match=r"unexpected inputs \['document_idz'\]"):
        model(input_ids=ids, labels=ids, document_idz=ids)


# ---------------------------------------------------------------------------------------------
# attention: GQA, RoPE, masking
# ---------------------------------------------------------------------------------------------
def test_gqa_equals_explicit_kv_repetition():
    torch.manual_seed(0)
    cfg = debug()
    attn = Attention(cfg, 0)
    B, T, H, KV, hd = 2, 10, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    x = torch.randn(B, T, cfg.d_model)
    pos = torch.arange(T).expand(B, T)
    rope = rope_cos_sin(pos, hd, cfg.rope_theta, x.dtype)
    ours = attn(x, rope, AttnMask(None, is_causal=True))

    q = apply_rope(attn.q_proj(x).view(B, T, H, hd).transpose(1, 2), *rope)
    k = apply_rope(attn.k_proj(x).view(B, T, KV, hd).transpose(1, 2), *rope)
    v = attn.v_proj(x).view(B, T, KV, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, H * hd))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_rope_is_relative():
    """q.k after RoPE depends only on the position difference."""
    hd = 16
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([[pq]]), hd, 10000.0, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([[pk]]), hd, 10000.0, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(dot(7, 3), dot(104, 100))
    assert not torch.allclose(dot(7, 3), dot(7, 4))


def test_positions_restart_per_document_and_skip_padding():
    valid = torch.tensor([[0, 0, 1, 1, 1, 1]]).bool()
    assert positions_for(valid, None).tolist() == [[0, 0, 0, 1, 2, 3]]
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert positions_for(torch.ones(1, 6, dtype=torch.bool), docs).tolist() == [[0, 1, 2, 0, 1, 0]]


@pytest.mark.parametrize("backend", ["sdpa", pytest.param("flash", id="flash_config_runs_sdpa_on_cpu")])
def test_document_masking_equals_separate_documents(backend):
    """A packed row with document_ids gives the same logits and loss terms as each document alone.
    On CPU tensors `attn_backend="flash"` runs SDPA (flash-attn needs CUDA fp16/bf16), so the second
    case checks that fallback only; flash-attn itself is checked on a GPU by benchmarks/gpu_check.py."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(attn_backend=backend)).eval()
    a, b = torch.randint(8, V, (1, 9)), torch.randint(8, V, (1, 13))
    packed = torch.cat([a, b], 1)
    docs = torch.tensor([[0] * 9 + [1] * 13])
    out = model(input_ids=packed, labels=packed, document_ids=docs)
    oa, ob = model(input_ids=a, labels=a), model(input_ids=b, labels=b)
    torch.testing.assert_close(out.logits, torch.cat([oa.logits, ob.logits], 1), atol=1e-5, rtol=1e-4)
    # loss terms are means over valid targets: (len - 1 - k) targets per document at depth k
    for k in range(4):
        na, nb = 9 - 1 - k, 13 - 1 - k
        la, lb, lp = ((o.lm_loss if k == 0 else o.mtp_losses[k - 1]) for o in (oa, ob, out))
        torch.testing.assert_close(lp, (na * la + nb * lb) / (na + nb), atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=1)).eval()
    ids = torch.randint(8, V, (1, 11))
    padded = torch.cat([ids, torch.full((1, 5), 1)], 1)  # right padding with <|pad|>
    mask = torch.cat([torch.ones(1, 11), torch.zeros(1, 5)], 1).long()
    ref = model(input_ids=ids).logits
    got = model(input_ids=padded, attention_mask=mask).logits[:, :11]
    assert torch.isfinite(model(input_ids=padded, attention_mask=mask).logits).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # labels=input_ids over the padding (the card's loop): padding targets are ignored, loss unchanged
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask, labels=padded).loss,
                               model(input_ids=ids, labels=ids).loss, atol=1e-5, rtol=1e-4)


def test_targets_crossing_documents_are_ignored():
    labels = torch.tensor([[10, 11, 12, 13, 14]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    assert QovaryxForCausalLM._targets(labels, docs, 1).tolist() == [[11, 12, -100, 14, -100]]
    assert QovaryxForCausalLM._targets(labels, docs, 2).tolist() == [[12, -100, -100, -100, -100]]
    assert QovaryxForCausalLM._targets(labels, None, 2).tolist() == [[12, 13, 14, -100, -100]]


def test_mtp_loss_averages_only_depths_with_targets():
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug())
    ids = torch.randint(8, V, (1, 8))
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2]])  # documents of 4, 3, 1 tokens: depth 3 (4 ahead) has no target
    out = model(input_ids=ids, labels=ids, document_ids=docs)
    assert out.mtp_losses[2].item() == 0.0 and (out.mtp_losses[:2] > 0).all()
    assert torch.equal(out.mtp_loss, out.mtp_losses[:2].mean())  # bit for bit, not just close
    out.loss.backward()  # the depth without targets takes no part in the update: zero gradients
    assert all(bool((p.grad == 0).all()) for p in model.mtp[2].parameters())
    assert model.mtp[1].proj.weight.grad.abs().sum() > 0


def test_mtp_depth_stays_causal_after_a_kv_cache():
    """labels with a cache: the MTP block runs over the new tokens only, and must not see later ones
    (the trunk mask's keys start with the cached tokens; slicing it as if they did not made it see all)."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=2)).eval()
    ids = torch.randint(8, V, (1, 20))
    chunk = ids[:, 12:]
    labels = torch.full_like(chunk, -100)
    labels[0, 2] = chunk[0, 2]  # the only MTP target: depth 1 at position 0 (inputs: tokens 0 and 1)
    later = chunk.clone()
    later[0, -1] = (later[0, -1] + 1) % V
    losses = [model(input_ids=c, labels=labels, cache=model(input_ids=ids[:, :12], use_cache=True).cache,
                    use_cache=True).mtp_losses for c in (chunk, later)]
    assert losses[0].item() > 0
    torch.testing.assert_close(losses[0], losses[1])  # the leak changed it by ~0.1


def test_mtp_depth_sees_the_token_k_ahead():
    """Depth 1 at position i combines h_i with emb(t_{i+1}) and predicts t_{i+2}: changing t_{i+1}
    changes its loss even with the trunk's contribution fixed."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=2)).eval()
    ids = torch.randint(8, V, (1, 12))
    base = model(input_ids=ids, labels=ids)
    assert base.mtp_losses.shape == (1,) and torch.isfinite(base.mtp_losses).all()
    labels_last_only = torch.full_like(ids, -100)
    labels_last_only[0, -1] = ids[0, -1]  # only t_11 is a target: main head from position 10, depth 1 from 9
    out = model(input_ids=ids, labels=labels_last_only)
    logits_d1 = None
    h = model.model.trunk(ids).h
    x = model.mtp[0].combine(h[:, :11], model.model.embed_tokens(ids[:, 1:]))
    cos, sin = rope_cos_sin(torch.arange(11)[None], model.config.head_dim, model.config.rope_theta, x.dtype)
    hk, _ = model.mtp[0].block(x, (cos, sin), AttnMask(None, is_causal=True))
    logits_d1 = model.lm_head(model.mtp[0].norm(hk))[0, 9]
    torch.testing.assert_close(out.mtp_losses[0], F.cross_entropy(logits_d1[None], ids[0, -1:]))


# ---------------------------------------------------------------------------------------------
# ternary and routed backends
# ---------------------------------------------------------------------------------------------
def test_ternary_forward_uses_three_levels_and_int8_activations():
    torch.manual_seed(0)
    lin = BitLinear(32, 16, bias=False)
    wq = lin.quantized_weight().detach()
    gamma = lin.weight.abs().mean()
    levels = torch.unique(wq)
    assert len(levels) == 3
    torch.testing.assert_close(levels, torch.stack([-gamma, torch.zeros(()), gamma]).detach())
    x = torch.randn(4, 5, 32) * 3
    xq = quantize_activations(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    codes = xq / step
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)  # integers
    assert codes.abs().max() <= 127 + 1e-4
    torch.testing.assert_close(lin(x), F.linear(xq, wq))


def test_ternary_straight_through_gradient():
    torch.manual_seed(0)
    lin = BitLinear(8, 4, bias=False)
    x = torch.randn(3, 8, requires_grad=True)
    g = torch.randn(3, 4)
    lin(x).backward(g)
    xq, wq = quantize_activations(x).detach(), lin.quantized_weight().detach()
    torch.testing.assert_close(lin.weight.grad, g.T @ xq)  # dL/dW as if W_q = W
    torch.testing.assert_close(x.grad, g @ wq)  # dL/dx as if x_q = x


def test_pack_ternary_round_trip_and_export(tmp_path):
    codes = torch.randint(-1, 2, (7, 5)).float()
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(35 / 4)
    assert torch.equal(unpack_ternary(packed, (7, 5)), codes)
    assert pack_ternary(torch.tensor([-1, 0, 1, 1, 0])).tolist() == [164, 85]

    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(ffn_kind="ternary_swiglu", mtp_k=1))
    path = export_ternary_packed(model, tmp_path / "ternary.safetensors")
    sd = load_ternary_packed(path)
    for name, mod in model.named_modules():
        if isinstance(mod, BitLinear):
            torch.testing.assert_close(sd[f"{name}.weight"], mod.quantized_weight().detach(), atol=0, rtol=0)
    torch.testing.assert_close(sd["model.embed_tokens.weight"], model.model.embed_tokens.weight.detach())
    cq, _ = ternary_quantize(model.model.layers[0].mlp.up_proj.weight)
    assert set(cq.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_ternary_file_version_is_checked(tmp_path):
    from safetensors.torch import save_file
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(1)}, str(p), metadata={"format": "qovaryx-ternary-packed", "format_version": "9"})
    with pytest.raises(ValueError, match="version '9'.*expected"):
        load_ternary_packed(p)


def effective_matrix(proj, d_in: int) -> torch.Tensor:
    """The (d_out, d_in) matrix of a bias-free linear map, read off its outputs on the unit vectors
    (so the check does not depend on how the projection stores its weights)."""
    with torch.no_grad():
        return proj(torch.eye(d_in)).T


@pytest.mark.parametrize("kind", ["lowrank_swiglu", "routed_lowrank_swiglu"])
def test_lowrank_projections_are_factorized_through_ffn_rank(kind):
    torch.manual_seed(0)
    cfg = debug(ffn_kind=kind, mtp_k=1)  # d 64, d_ff 176, rank 16
    d, ff, r, E = cfg.d_model, cfg.d_ff, cfg.ffn_rank, cfg.ffn_experts
    model = QovaryxForCausalLM(cfg)
    routed = kind.startswith("routed")
    lowrank = 3 * r * (d + ff)  # B (out x r) and A (r x in) for gate, up, down (dense: 3 * d * ff = 33,792)
    per_layer = E * lowrank + d * E if routed else lowrank  # closed forms of docs/MODEL.md
    for layer in model.model.layers:
        assert sum(p.numel() for p in layer.mlp.parameters()) == per_layer
    hd = d // cfg.n_head
    block = 2 * d * d + 2 * d * cfg.n_kv_head * hd + per_layer + 2 * d
    assert parameter_counts(cfg)["trunk_blocks"] == cfg.n_layer * block

    ffns = model.model.layers[0].mlp.experts if routed else [model.model.layers[0].mlp]
    for ffn in ffns:
        for name, d_in, d_out in [("gate_proj", d, ff), ("up_proj", d, ff), ("down_proj", ff, d)]:
            w = effective_matrix(getattr(ffn, name), d_in)
            assert w.shape == (d_out, d_in)
            # rank exactly r: factorized through r (a dense map has rank min(d_in, d_out) = 64), and
            # the random factors are generic, so the rank is not lower either
            assert torch.linalg.matrix_rank(w).item() == r, name
        # the FFN is SwiGLU over these three maps
        x = torch.randn(3, d)
        gate, up, down = (effective_matrix(getattr(ffn, n), i) for n, i in
                          [("gate_proj", d), ("up_proj", d), ("down_proj", ff)])
        with torch.no_grad():
            got, _ = ffn(x[None])
        torch.testing.assert_close(got[0], F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_aux_loss_at_uniform_and_at_one_expert(top_k):
    """Uniform router: exactly 1 (and z-loss log(E)^2); every token on one expert: near E / top_k.
    (Uniform is not the minimum: see test_model_contracts.py for a non-uniform router below 1.)"""
    torch.manual_seed(0)
    moe = RoutedLowRankSwiGLU(32, 64, 8, n_experts=4, top_k=top_k)
    x = torch.randn(2, 50, 32)
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform probabilities
    _, aux = moe(x)
    torch.testing.assert_close(aux["aux_loss"], torch.tensor(1.0))
    torch.testing.assert_close(aux["z_loss"], torch.tensor(math.log(4) ** 2))
    with torch.no_grad():  # all tokens strongly preferring expert 0: near the maximum E / top_k
        moe.router.weight.zero_()
        moe.router.weight[0] = 50.0
    _, aux = moe(x.abs())
    assert aux["aux_loss"] > 0.9 * 4 / top_k and aux["load"][0] >= 1 / top_k - 1e-6


def test_moe_statistics_ignore_padding():
    torch.manual_seed(0)
    moe = RoutedLowRankSwiGLU(16, 32, 4, n_experts=4, top_k=1)
    x = torch.randn(1, 8, 16)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    _, a = moe(x, mask)
    _, b = moe(x[:, :5])
    torch.testing.assert_close(a["aux_loss"], b["aux_loss"])
    torch.testing.assert_close(a["load"], b["load"])


# ---------------------------------------------------------------------------------------------
# decision head and chart-patch encoder
# ---------------------------------------------------------------------------------------------
def test_decision_loss_known_answer_and_errors():
    torch.manual_seed(0)
    cfg = debug(mtp_k=1, decision_head_enabled=True, decision_class_weights=[1.0, 2.0, 1.0, 0.5],
                calibration_loss_weight=0.2)
    model = QovaryxForCausalLM(cfg)
    ids = torch.randint(8, V, (3, 10))
    pos, lab = torch.tensor([9, 4, 0]), torch.tensor([1, -100, 3])
    out = model(input_ids=ids, decision_positions=pos, decision_labels=lab)
    w = torch.tensor(cfg.decision_class_weights)
    ce = F.cross_entropy(out.decision_logits, lab, weight=w, ignore_index=-100)
    onehot = F.one_hot(torch.tensor([1, 3]), 4).float()
    brier = (out.decision_probs[[0, 2]] - onehot).square().sum(-1).mean()
    torch.testing.assert_close(out.decision_loss, ce + 0.2 * brier)
    torch.testing.assert_close(out.loss, cfg.decision_weight * out.decision_loss)
    hidden = model.model.norm(model.model.trunk(ids).h)
    torch.testing.assert_close(out.decision_logits[1], model.decision_head.proj(hidden[1, 4]))
    with pytest.raises(ValueError, match="decision_positions must index"):
        model(input_ids=ids, decision_positions=torch.tensor([10, 0, 0]))
    with pytest.raises(ValueError, match="decision_head_enabled=False"):
        QovaryxForCausalLM(debug())(input_ids=ids, decision_labels=lab, decision_positions=pos)


def test_rows_without_image_get_no_prefix():
    torch.manual_seed(0)
    cfg = debug(mtp_k=2, chart_patch_encoder_enabled=True, image_channels=1)
    model = QovaryxForCausalLM(cfg).eval()
    ids = torch.randint(8, V, (2, 12))
    pix = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = model(input_ids=ids, labels=ids, pixel_values=pix, image_mask=torch.tensor([True, False]))
    alone = model(input_ids=ids[1:], labels=ids[1:])
    torch.testing.assert_close(out.logits[1:], alone.logits, atol=1e-5, rtol=1e-4)  # row 1: as if text only
    with_img = model(input_ids=ids[:1], pixel_values=pix[:1])
    torch.testing.assert_close(out.logits[:1], with_img.logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(with_img.logits, model(input_ids=ids[:1]).logits)  # the image is seen
    hidden = model(input_ids=ids, pixel_values=pix, output_hidden_states=True).hidden_states
    assert hidden[-1].shape[1] == cfg.n_image_tokens + 12 == 16 + 12
    with pytest.raises(ValueError, match=r"expected \(B, 1, 28, 28\)"):
        model(input_ids=ids, pixel_values=torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    cfg = debug(ffn_kind="routed_lowrank_swiglu")
    a, b = QovaryxForCausalLM(cfg), QovaryxForCausalLM(cfg)
    b.load_state_dict(a.state_dict())
    b.activation_checkpointing_enable()
    assert b.model.gradient_checkpointing
    calls = {"a": 0, "b": 0}
    for name, m in (("a", a), ("b", b)):
        m.model.layers[0].register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    batch = full_batch(cfg)
    la, lb = a(**batch).loss, b(**batch).loss
    la.backward(), lb.backward()
    assert calls == {"a": 1, "b": 2}  # recomputed in the backward (pre-hooks: the recompute stops early)
    torch.testing.assert_close(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, n
        else:
            torch.testing.assert_close(pa.grad, pb.grad, msg=n)


@pytest.mark.parametrize("kind", FFN_KINDS)
def test_bf16_autocast_and_bf16_weights(kind):
    """bf16 autocast (the card's training loop) over fp32 weights, and pure bf16 weights, run with
    every backend and both heads; the router stays float32 and RoPE keeps q/k in bf16 (flash-attn
    needs fp16/bf16 inputs)."""
    torch.manual_seed(0)
    cfg = debug(ffn_kind=kind, decision_head_enabled=True, chart_patch_encoder_enabled=True, image_channels=1)
    model = QovaryxForCausalLM(cfg)
    batch = full_batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    if kind == "routed_lowrank_swiglu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, aux = model.model.layers[0].mlp(torch.randn(2, 5, cfg.d_model))
        assert aux["z_loss"].dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(out.loss)
    model.to(torch.bfloat16).zero_grad()
    loss16 = model(**batch).loss
    loss16.backward()
    assert torch.isfinite(loss16)
    torch.testing.assert_close(loss16, out.loss, atol=0.1, rtol=0.02)  # same weights, rounded to bf16
    q = torch.randn(1, 2, 3, 16, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(torch.arange(3)[None], 16, 10000.0, torch.float32)
    assert apply_rope(q, cos, sin).dtype == torch.bfloat16


def test_docstring_examples():
    import doctest

    from qovaryx_model import attention, config, ffn, heads, model

    for mod in (attention, config, ffn, heads, model):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__


def test_gpu_check_dry_run_on_cpu(capsys):
    """benchmarks/gpu_check.py cannot measure here (no GPU); its --dry-run runs every code path on
    the debug preset, and without --dry-run it refuses clearly."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "debug flash" in out and "flops of one 350m step" in out
    # the trainer runs (train() with 350m.yaml and 1b.yaml on the debug preset) reach the summary table
    table = out[out.index("\nsummary"):]
    assert "350m bf16 autocast" in table and "1b mtp_k=1 batch 1" in table and "correctness checks: PASS" in table
    if not torch.cuda.is_available():
        assert gpu_check.main([]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
