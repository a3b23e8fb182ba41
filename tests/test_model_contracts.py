"""qovaryx_model against the conventions it promises (issue 11): transformers' `hidden_states`, the
decision position counted among real tokens, static-cache generation, an export that leaves the live
model alone, the exact reload of the packed ternary file, config validation, and what the MoE
load-balancing loss does (and does not) promise."""
from __future__ import annotations

import pytest
import torch

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM, export_pretrained
from qovaryx_model.ffn import BitLinear, RoutedLowRankSwiGLU
from qovaryx_model.hf import export_ternary_packed, load_ternary_model

V = 512  # small vocab keeps the debug model quick


def debug(**kw) -> QovaryxConfig:
    return QovaryxConfig.from_preset("debug", vocab_size=V, **kw)


# ---------------------------------------------------------------------------------------------
# hidden states: transformers' convention
# ---------------------------------------------------------------------------------------------
def test_hidden_states_are_embedding_then_every_block_with_the_last_normed():
    torch.manual_seed(0)
    cfg = debug(mtp_k=1, chart_patch_encoder_enabled=True, image_channels=1)
    N = cfg.n_image_tokens
    model = QovaryxForCausalLM(cfg).eval()
    ids, pix = torch.randint(8, V, (2, 9)), torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert model(input_ids=ids, pixel_values=pix).hidden_states is None  # not asked: None

    out = model(input_ids=ids, pixel_values=pix, output_hidden_states=True)
    hs = out.hidden_states
    assert isinstance(hs, tuple) and len(hs) == cfg.n_layer + 1
    assert all(h.shape == (2, N + 9, cfg.d_model) for h in hs)  # image prefix included
    with torch.no_grad():
        torch.testing.assert_close(hs[0][:, N:], model.model.embed_tokens(ids))  # the embedding output
        torch.testing.assert_close(hs[0][:, :N], model.model.patch_encoder(pix))
        torch.testing.assert_close(out.logits, model.lm_head(hs[-1][:, N:]))  # the last one after the final norm
        # state k is the residual stream after block k: a model cut to its first k blocks ends there
        for k in range(1, cfg.n_layer):
            short = QovaryxForCausalLM(debug(mtp_k=1, chart_patch_encoder_enabled=True, image_channels=1,
                                             n_layer=k)).eval()
            short.load_state_dict(model.state_dict(), strict=False)
            torch.testing.assert_close(hs[k], short.model.trunk(ids, pixel_values=pix).h)
            assert not torch.allclose(hs[k], hs[k - 1])

    # the config switch, and the bare trunk (AutoModel) follow the same convention
    model.config.output_hidden_states = True
    again = model(input_ids=ids, pixel_values=pix).hidden_states
    assert len(again) == cfg.n_layer + 1 and all(torch.equal(a, b) for a, b in zip(again, hs))
    model.config.output_hidden_states = False
    trunk = model.model(input_ids=ids, pixel_values=pix, output_hidden_states=True)
    assert len(trunk.hidden_states) == cfg.n_layer + 1
    torch.testing.assert_close(trunk.hidden_states[-1], trunk.last_hidden_state)
    torch.testing.assert_close(trunk.last_hidden_state, hs[-1])


def test_generate_returns_hidden_states_per_step():
    torch.manual_seed(0)
    cfg = debug(mtp_k=1)
    model = QovaryxForCausalLM(cfg).eval()
    prompt = torch.randint(8, V, (2, 6))
    g = model.generate(prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       output_hidden_states=True, return_dict_in_generate=True)
    assert len(g.hidden_states) == 3  # one entry per generated token
    first, later = g.hidden_states[0], g.hidden_states[1:]
    assert len(first) == cfg.n_layer + 1 and all(h.shape == (2, 6, cfg.d_model) for h in first)
    assert all(len(s) == cfg.n_layer + 1 and s[-1].shape == (2, 1, cfg.d_model) for s in later)
    full = model(input_ids=g.sequences[:, :-1], output_hidden_states=True).hidden_states
    torch.testing.assert_close(later[-1][-1][:, 0], full[-1][:, -1], atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# decision head: the position counts the row's real text tokens
# ---------------------------------------------------------------------------------------------
def test_decision_position_counts_real_tokens_whatever_the_padding_side():
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=1, decision_head_enabled=True)).eval()
    row = torch.randint(8, V, (1, 7))
    pos, lab = torch.tensor([2, 6]), torch.tensor([1, 3])
    alone = model(input_ids=row.expand(2, 7), decision_positions=pos, decision_labels=lab)
    pad = torch.ones(2, 4, dtype=torch.long)  # <|pad|>
    zeros, ones = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 7, dtype=torch.long)
    for ids, mask in [(torch.cat([pad, row.expand(2, 7)], 1), torch.cat([zeros, ones], 1)),   # left padding
                      (torch.cat([row.expand(2, 7), pad], 1), torch.cat([ones, zeros], 1))]:  # right padding
        out = model(input_ids=ids, attention_mask=mask, decision_positions=pos, decision_labels=lab)
        torch.testing.assert_close(out.decision_logits, alone.decision_logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.decision_loss, alone.decision_loss, atol=1e-5, rtol=1e-4)
    # a position past the row's real tokens is an error, not a pooled pad
    right = torch.cat([row, torch.ones(1, 4, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="decision_positions.*real text tokens"):
        model(input_ids=right, attention_mask=torch.cat([ones[:1], zeros[:1]], 1), decision_positions=torch.tensor([8]))


# ---------------------------------------------------------------------------------------------
# static cache
# ---------------------------------------------------------------------------------------------
def test_static_cache_generation_equals_dynamic_cache():
    """`cache_implementation="static"` (what torch.compile'd decoding uses): transformers passes a 4-D
    mask over the whole preallocated cache; greedy output equals the dynamic cache's, left padding too."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=1)).eval().double()
    ids = torch.randint(8, V, (2, 7))
    ids[0, :3] = 1
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_scores=True, return_dict_in_generate=True)
    dyn = model.generate(ids, attention_mask=mask, **kw)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dyn.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dyn.scores))
    # without padding as well (no mask at all: the cache's unfilled slots must still be masked)
    one = model.generate(ids[1:], cache_implementation="static", **kw)
    assert torch.equal(one.sequences, dyn.sequences[1:])


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def test_export_leaves_the_live_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(mtp_k=1)).eval()
    ids = torch.randint(8, V, (1, 5))
    before_cfg = model.generation_config.to_dict()
    before = model.generate(ids, max_new_tokens=12)
    export_pretrained(model, tmp_path / "exp")
    assert model.generation_config.to_dict() == before_cfg
    assert torch.equal(model.generate(ids, max_new_tokens=12), before)  # still greedy, not sampling
    from transformers import GenerationConfig
    assert GenerationConfig.from_pretrained(tmp_path / "exp").do_sample is True  # the folder has the defaults


# ---------------------------------------------------------------------------------------------
# packed ternary weights: exact reload
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_packed_ternary_reload_gives_the_exported_model(tmp_path, tied):
    torch.manual_seed(0)
    model = QovaryxForCausalLM(debug(ffn_kind="ternary_swiglu", mtp_k=2, tie_embeddings=tied)).eval()
    path = export_ternary_packed(model, tmp_path / "t.safetensors")
    back = load_ternary_model(path).eval()
    assert back.config.to_dict() == model.config.to_dict()
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    for (name, mod), mod_back in zip(model.named_modules(), back.modules()):
        if isinstance(mod, BitLinear):  # the forward's weight, bit for bit
            assert torch.equal(mod_back.quantized_weight(), mod.quantized_weight()), name
    ids = torch.randint(8, V, (2, 12))
    a, b = model(input_ids=ids, labels=ids), back(input_ids=ids, labels=ids)
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)  # was off by up to 0.40
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-5)
    # the restored model re-exports to the same tensors, and refuses a float save (its weights are codes)
    again = load_ternary_model(export_ternary_packed(back, tmp_path / "again.safetensors"))
    torch.testing.assert_close(again(input_ids=ids).logits, b.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="export_ternary_packed"):
        back.save_pretrained(tmp_path / "float")


# ---------------------------------------------------------------------------------------------
# config validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,field", [
    (dict(rope_theta=0.0), "rope_theta"), (dict(rope_theta=-10000.0), "rope_theta"),
    (dict(rope_theta=float("nan")), "rope_theta"), (dict(rms_norm_eps=-1e-5), "rms_norm_eps"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps"),
    (dict(mtp_weight=float("nan")), "mtp_weight"), (dict(moe_aux_weight=float("inf")), "moe_aux_weight"),
    (dict(decision_weight=float("nan")), "decision_weight"),
    (dict(decision_class_weights=[1.0, float("nan"), 1.0, 1.0]), "decision_class_weights"),
    (dict(eos_token_id=V), "eos_token_id"), (dict(eos_token_id=[0, V + 3]), "eos_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"), (dict(bos_token_id=-1), "bos_token_id"),
    (dict(bos_token_id=V), "bos_token_id"), (dict(pad_token_id=-2), "pad_token_id"),
    (dict(pad_token_id=V), "pad_token_id"), (dict(eos_token_id=[]), "eos_token_id"),
    (dict(eos_token_id=True), "eos_token_id"), (dict(logit_softcap=float("nan")), "logit_softcap"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
])
def test_config_refuses_bad_numbers_and_token_ids(kw, field):
    with pytest.raises(ValueError, match=rf"QovaryxConfig\.{field}="):
        debug(**kw)


def test_config_accepts_the_edges():
    cfg = debug(eos_token_id=[0, V - 1], bos_token_id=None, pad_token_id=None, rms_norm_eps=0.0)
    assert cfg.eos_token_id == [0, V - 1]


def test_default_special_ids_are_the_data_side_tokens():
    """config.py stays self-contained (it is copied into every export), so its ids are literals: they
    must equal the tokenizer's fixed special tokens."""
    from qovaryx_data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

    cfg = QovaryxConfig()
    assert cfg.pad_token_id == SPECIAL_TOKENS.index(PAD_TOKEN)
    assert cfg.eos_token_id == SPECIAL_TOKENS.index(EOS_TOKEN)
    assert cfg.bos_token_id == SPECIAL_TOKENS.index(BOS_TOKEN)


# ---------------------------------------------------------------------------------------------
# MoE load balancing: what the loss promises
# ---------------------------------------------------------------------------------------------
def router_on_logits(logits: torch.Tensor, top_k: int = 1) -> RoutedLowRankSwiGLU:
    """A routed FFN whose router logits are the inputs themselves (router = identity), so a test
    chooses each token's logits directly."""
    E = logits.shape[-1]
    moe = RoutedLowRankSwiGLU(E, 4, 1, n_experts=E, top_k=top_k)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E))
    return moe


def test_moe_aux_loss_known_value_below_the_uniform_router():
    """E * sum_e f_e * P_e on a hand-computed case: two tokens over three experts, each token's top
    choice a different expert, both giving 0.4 to the third. f = (1/2, 1/2, 0), P = (0.3, 0.3, 0.4),
    so the loss is 3 * (0.5 * 0.3 + 0.5 * 0.3) = 0.9: below the uniform router's 1, although the
    router is not uniform (uniform is not its minimum)."""
    probs = torch.tensor([[[0.45, 0.15, 0.40], [0.15, 0.45, 0.40]]])
    _, aux = router_on_logits(probs.log())(probs.log())
    torch.testing.assert_close(aux["load"], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(aux["aux_loss"], torch.tensor(0.9))
    z = torch.logsumexp(probs.log(), -1).square().mean()  # logsumexp of log-probabilities is 0
    torch.testing.assert_close(aux["z_loss"], z)
    uniform = torch.zeros(1, 5, 3)
    _, aux = router_on_logits(uniform)(uniform)
    torch.testing.assert_close(aux["aux_loss"], torch.tensor(1.0))


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_aux_loss_gradient_pushes_toward_balance(top_k):
    """The gradient flows through P only (f is a count): d loss / d p_{n,e} = E * f_e / N for every
    token n, so each token's probability moves away from the loaded experts; descending the loss
    alone balances a router that sends almost everything to one expert."""
    torch.manual_seed(0)
    E, N = 4, 64
    logits = (torch.randn(1, N, E) + torch.tensor([3.0, 0.0, 0.0, 0.0])).requires_grad_(True)
    moe = router_on_logits(logits.detach(), top_k)
    _, aux = moe(logits)
    aux["aux_loss"].backward()
    p = logits.detach().softmax(-1)[0]  # (N, E)
    f = aux["load"]
    dP = E * f / N  # d loss / d p_{n,e}, the same for every token
    expected = p * (dP - (p * dP).sum(-1, keepdim=True))  # through the softmax
    torch.testing.assert_close(logits.grad[0], expected)

    assert aux["load"].max().item() >= 0.9 / top_k  # expert 0 takes (almost) every token's first slot
    x = logits.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=50.0)
    for _ in range(50):
        opt.zero_grad()
        _, aux = moe(x)
        aux["aux_loss"].backward()
        opt.step()
    _, aux = moe(x.detach())
    torch.testing.assert_close(aux["load"], torch.full((E,), 1 / E), atol=0.05, rtol=0)
    assert abs(aux["aux_loss"].item() - 1.0) < 0.05
