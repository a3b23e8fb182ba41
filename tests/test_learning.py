"""Learning-quality knobs (issue 9): initializers, residual scaling, QK-norm, logit soft-capping, Muon.

Each init is checked for what it promises (the std per layer kind, the residual scaling, zeros);
each knob and optimizer trains a debug model a few steps on real text and the loss falls.
"""
from __future__ import annotations

import math

import pytest
import torch

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
from qovaryx_model.config import PRESETS
from qovaryx_model.muon import MuonAdamW, build_optimizer, param_groups

V = 512


def debug(**kw) -> QovaryxConfig:
    return QovaryxConfig.from_preset("debug", vocab_size=V, **kw)


def std_close(w: torch.Tensor, std: float, k: float = 4.0) -> bool:
    """Sample std of a zero-mean normal within k standard errors (relative s.e. ~ 1/sqrt(2n))."""
    return abs(w.detach().float().std().item() / std - 1) < k / math.sqrt(2 * w.numel())


def residual_outs(model) -> dict[str, torch.Tensor]:
    """Weights that write into the residual stream: every o_proj and FFN down_proj (B factor when low-rank)."""
    out = {}
    for name, m in model.named_modules():
        if name.endswith(("self_attn.o_proj", "down_proj")):
            w = m.b.weight if hasattr(m, "b") else getattr(m, "weight", None)
            if w is not None:
                out[name] = w
    return out


@pytest.mark.parametrize("kind", ["swiglu", "ternary_swiglu"])
def test_normal_init_std_per_layer_kind_and_residual_scaling(kind):
    torch.manual_seed(0)
    cfg = debug(initializer="normal", initializer_range=0.03, residual_init="scaled", ffn_kind=kind,
                decision_head_enabled=True)
    model = QovaryxForCausalLM(cfg)
    res = residual_outs(model)
    assert len(res) == 2 * (cfg.n_layer + cfg.mtp_k - 1)  # trunk blocks and MTP depths
    scaled = 0.03 / math.sqrt(2 * cfg.n_layer)  # the trunk's n_layer, also for the MTP depths' blocks
    for name, w in res.items():
        assert std_close(w, scaled), name
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name not in res:  # q, k, v, gate, up, MTP proj, decision head
            assert std_close(m.weight, 0.03), name
    assert std_close(model.model.embed_tokens.weight, 0.03)
    assert model.lm_head.weight.abs().max() > 3 * 0.03  # untied debug head: a normal, not Glorot's uniform
    assert (model.decision_head.proj.bias == 0).all()
    assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, torch.nn.RMSNorm))


@pytest.mark.parametrize("kind", ["lowrank_swiglu", "routed_lowrank_swiglu"])
def test_lowrank_factors_compose_to_the_dense_std(kind):
    torch.manual_seed(0)
    cfg = debug(initializer="normal", residual_init="scaled", ffn_kind=kind, d_model=128, d_ff=256, ffn_rank=64)
    model = QovaryxForCausalLM(cfg)
    mlp = model.model.layers[0].mlp
    experts = mlp.experts if kind == "routed_lowrank_swiglu" else [mlp]
    scale = 1 / math.sqrt(2 * cfg.n_layer)
    for e in experts:
        for proj, s in ((e.gate_proj, 1.0), (e.up_proj, 1.0), (e.down_proj, scale)):
            assert std_close(proj.a.weight, 0.02)
            assert std_close(proj.b.weight, s / math.sqrt(cfg.ffn_rank))
            effective = proj.b.weight @ proj.a.weight  # B·A: std of a dense weight, times the residual scale
            assert abs(effective.std().item() / (0.02 * s) - 1) < 0.1


def test_zero_residual_init_zeroes_exactly_the_output_projections_and_they_still_learn():
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(initializer="normal", residual_init="zero", mtp_k=2))
    res = residual_outs(model)
    assert res and all(bool((w == 0).all()) for w in res.values())
    others = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in res]
    assert others and all(w.std() > 0 for w in others)
    ids = torch.randint(2, V, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in res.values())  # zero init is not dead


def test_xavier_with_scaled_residuals_shrinks_the_glorot_bound():
    torch.manual_seed(0)
    cfg = debug(initializer="xavier", residual_init="scaled")
    model = QovaryxForCausalLM(cfg)
    w = model.model.layers[0].self_attn.o_proj.weight
    a = math.sqrt(6 / (2 * cfg.d_model)) / math.sqrt(2 * cfg.n_layer)
    assert w.abs().max() <= a * (1 + 1e-6) and w.abs().max() > 0.9 * a


def test_class_defaults_are_the_cards_and_presets_carry_the_new_ones(tmp_path):
    cfg = QovaryxConfig()  # an exported config.json written before these fields existed loads as this
    assert (cfg.initializer, cfg.residual_init, cfg.qk_norm, cfg.logit_softcap) == ("xavier", "none", False, 0.0)
    old = QovaryxConfig.from_preset("debug").to_dict()
    for key in ("initializer", "initializer_range", "residual_init", "qk_norm", "logit_softcap"):
        old.pop(key)
    assert QovaryxConfig.from_dict(old).initializer == "xavier"
    for name, preset in PRESETS.items():
        cfg = QovaryxConfig.from_preset(name)
        assert (cfg.initializer, cfg.residual_init) == ("normal", "scaled"), name
    cfg = debug(qk_norm=True, logit_softcap=30.0)
    cfg.save_pretrained(tmp_path)
    back = QovaryxConfig.from_pretrained(tmp_path)
    assert (back.initializer, back.residual_init, back.qk_norm, back.logit_softcap) == ("normal", "scaled", True, 30.0)


@pytest.mark.parametrize("kw,field", [
    (dict(initializer="kaiming"), "initializer"), (dict(residual_init="half"), "residual_init"),
    (dict(initializer_range=0.0), "initializer_range"), (dict(logit_softcap=-1.0), "logit_softcap")])
def test_invalid_knobs_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"QovaryxConfig.{field}="):
        debug(**kw)


def test_qk_norm_makes_attention_invariant_to_the_scale_of_q_and_k():
    torch.manual_seed(0)
    ids = torch.randint(2, V, (2, 16))
    for qk_norm in (True, False):
        model = QovaryxForCausalLM(debug(qk_norm=qk_norm, mtp_k=1)).eval()
        before = model(input_ids=ids).logits
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(5.0)
                layer.self_attn.k_proj.weight.mul_(3.0)
        after = model(input_ids=ids).logits
        assert torch.allclose(before, after, atol=1e-4) == qk_norm


def test_logit_softcap_is_c_tanh_of_the_uncapped_logits():
    torch.manual_seed(0)
    capped = QovaryxForCausalLM(debug(logit_softcap=2.0, mtp_k=1)).eval()
    plain = QovaryxForCausalLM(debug(mtp_k=1)).eval()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        capped.lm_head.weight.mul_(50.0)  # large logits, so the cap is reached
        plain.lm_head.weight.mul_(50.0)
    ids = torch.randint(2, V, (1, 12))
    raw, out = plain(input_ids=ids).logits, capped(input_ids=ids).logits
    assert raw.abs().max() > 4.0 and out.abs().max() <= 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))


def test_param_groups_cover_every_parameter_once():
    model = QovaryxForCausalLM(debug(tie_embeddings=True, qk_norm=True, chart_patch_encoder_enabled=True))
    groups = {g["group"]: g for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert {id(p) for p in groups["embedding"]["params"]} == {id(model.model.embed_tokens.weight),
                                                               id(model.model.patch_encoder.pos)}
    assert groups["embedding"]["weight_decay"] == groups["scalar"]["weight_decay"] == 0.0
    assert groups["matrix"]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups["matrix"]["params"])
    with pytest.raises(ValueError, match="Muon takes 2-D matrices only"):  # the Conv2d patch encoder
        build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        build_optimizer(model, "sgd", lr=1e-3, weight_decay=0.1)


def test_muon_state_dict_round_trip_and_version_check():
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=1))
    opt = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, MuonAdamW)
    ids = torch.randint(2, V, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, "muon", lr=1e-3, weight_decay=0.1)
    fresh.load_state_dict(state)
    buf = next(iter(fresh.muon.state.values()))["momentum_buffer"]
    torch.testing.assert_close(buf, next(iter(opt.muon.state.values()))["momentum_buffer"])
    with pytest.raises(ValueError, match="expected 'qovaryx-muon-adamw' version 1"):
        fresh.load_state_dict({**state, "version": 2})


@pytest.fixture(scope="module")
def text_windows(small_tokenizer, shakespeare_files) -> torch.Tensor:
    """24 windows of 33 tokens of a play, tokenized with the session's small BPE."""
    from qovaryx_data import load_tokenizer

    tok = load_tokenizer(small_tokenizer)
    ids = tok.encode(shakespeare_files[0].read_text(encoding="utf-8")[:40_000], add_special_tokens=False).ids
    n = 24 * 33
    assert len(ids) >= n
    return torch.tensor(ids[:n]).view(24, 33)


@pytest.mark.parametrize("knobs,optimizer", [
    (dict(), "adamw"), (dict(), "muon"), (dict(residual_init="zero"), "adamw"), (dict(qk_norm=True), "adamw"),
    (dict(logit_softcap=15.0), "adamw")])
def test_each_knob_and_optimizer_learns_real_text(text_windows, knobs, optimizer):
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=2048, mtp_k=1, tie_embeddings=True,
                                                         **knobs))
    opt = build_optimizer(model, optimizer, lr=1e-2, weight_decay=0.1)
    losses = []
    for step in range(12):
        batch = text_windows[(step % 6) * 4:(step % 6) * 4 + 4]
        loss = model(input_ids=batch, labels=batch).lm_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > math.log(2048) - 0.5  # starts near uniform over the vocabulary
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses  # and learns the text (a second pass over it)
