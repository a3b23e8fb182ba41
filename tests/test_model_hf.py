"""qovaryx_model with transformers: Auto classes, KV-cache generation, export and loading without
qovaryx installed, `qovaryx-train init`, and a debug model overfitting one real sentence."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM, export_pretrained
from qovaryx_model.cli import main as cli_main

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|image_start|>", "<|image_end|>", "<|decision|>",
            "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>"]

# Run in a fresh interpreter where `import qovaryx_model` / `qovaryx_data` fail (the editable install
# is blocked on sys.meta_path), so only torch, transformers and safetensors are available.
NO_QOVARYX = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("qovaryx_model", "qovaryx_data"):
                raise ModuleNotFoundError(f"blocked: {name}")
    sys.meta_path.insert(0, _Block())
    try:
        import qovaryx_model
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("qovaryx_model is importable; the test would prove nothing")
""")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, shakespeare_files) -> Path:
    """A 1,024-token byte-level BPE with the contract's special tokens, trained on one real play."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(shakespeare_files[0])], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0],
                                   pad_token=SPECIALS[1])
    out = tmp_path_factory.mktemp("tok") / "bpe1k"
    fast.save_pretrained(out)
    return out


def run_clean(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-I", "-c", NO_QOVARYX + textwrap.dedent(code)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_auto_classes_know_qovaryx():
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qovaryx", **{k: v for k, v in QovaryxConfig.from_preset("debug").to_dict().items()
                                               if k != "model_type"})
    assert isinstance(cfg, QovaryxConfig)
    assert type(AutoModelForCausalLM.from_config(cfg)) is QovaryxForCausalLM
    assert type(AutoModel.from_config(cfg)).__name__ == "QovaryxModel"


def greedy_without_cache(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("kind", ["swiglu", "routed_lowrank_swiglu"])
def test_kv_cache_generation_equals_full_forward_greedy(kind):
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=300, ffn_kind=kind)).eval().double()
    prompt = torch.randint(8, 300, (1, 7))
    ref = greedy_without_cache(model, prompt, 12)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), ref)  # cache on (the default)
    assert torch.equal(model.generate(prompt, use_cache=False, **kw), ref)

    # a left-padded batch: every row equals its own unpadded greedy run
    short = torch.randint(8, 300, (1, 4))
    batch = torch.cat([torch.cat([torch.ones(1, 3, dtype=torch.long), short], 1), prompt], 0)  # pad id 1
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = model.generate(batch, attention_mask=mask, **kw)
    assert torch.equal(out[1:], ref)
    assert torch.equal(out[:1, 3:], greedy_without_cache(model, short, 12))


def test_chunked_prefill_with_cache_equals_one_forward():
    """Feeding a prompt in chunks through the KV cache (the causal mask offset by the cached length)
    gives the logits of one full forward."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=300)).eval()
    ids = torch.randint(8, 300, (2, 15))
    full = model(input_ids=ids, use_cache=False).logits
    first = model(input_ids=ids[:, :6], use_cache=True)
    second = model(input_ids=ids[:, 6:11], cache=first.cache, use_cache=True)
    third = model(input_ids=ids[:, 11:], cache=second.cache, use_cache=True)
    assert third.cache.get_seq_length() == 15
    got = torch.cat([first.logits, second.logits, third.logits], 1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-4)


def test_export_loads_without_qovaryx_and_init_cli(tmp_path, tok_dir):
    torch.manual_seed(0)
    cfg = QovaryxConfig.from_preset("debug", vocab_size=1024, decision_head_enabled=True,
                                    ffn_kind="routed_lowrank_swiglu")
    model = QovaryxForCausalLM(cfg).eval()
    from qovaryx_model.hf import load_hf_tokenizer

    exp = export_pretrained(model, tmp_path / "exp", tokenizer=load_hf_tokenizer(tok_dir))
    names = {p.name for p in exp.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
            "tokenizer_config.json", "config.py", "model.py", "attention.py", "ffn.py", "heads.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickles
    assert json.loads((exp / "config.json").read_text())["format_version"] == "1.0"
    auto_map = json.loads((exp / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "model.QovaryxForCausalLM" and "AutoConfig" in auto_map
    ids = torch.randint(8, 1024, (2, 9))
    torch.save({"ids": ids, "logits": model(input_ids=ids).logits.detach(),
                "gen": model.generate(ids[:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)},
               tmp_path / "ref.pt")

    r = CliRunner().invoke(cli_main, ["init", "--preset", "debug", "--tokenizer", str(tok_dir),
                                      "--out", str(tmp_path / "init"), "--dtype", "bf16", "--set", "mtp_k=2"])
    assert r.exit_code == 0, r.output
    assert "parameters, vocab 1024, bf16" in r.output
    init_names = {p.name for p in (tmp_path / "init").iterdir()}
    for f in tok_dir.iterdir():  # the tokenizer folder travels byte for byte
        assert (tmp_path / "init" / f.name).read_bytes() == f.read_bytes(), f.name
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json",
            "model.py"} <= init_names
    gen_cfg = json.loads((tmp_path / "init" / "generation_config.json").read_text())
    assert gen_cfg["do_sample"] is True and gen_cfg["eos_token_id"] == 0 and gen_cfg["pad_token_id"] == 1
    # refusing to overwrite is a clean CLI error
    again = CliRunner().invoke(cli_main, ["init", "--preset", "debug", "--tokenizer", str(tok_dir),
                                          "--out", str(tmp_path / "init")])
    assert again.exit_code != 0 and "not an empty folder" in again.output

    r = run_clean("""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ref = torch.load("ref.pt")
        m = AutoModelForCausalLM.from_pretrained("exp", trust_remote_code=True).eval()
        assert type(m).__name__ == "QovaryxForCausalLM", type(m)
        # two model instances: equal weights, but not necessarily the same kernels (alignment, threads)
        torch.testing.assert_close(m(input_ids=ref["ids"]).logits, ref["logits"], rtol=1e-5, atol=1e-5)
        gen = m.generate(ref["ids"][:1], max_new_tokens=6, min_new_tokens=6, do_sample=False)
        # greedy tokens of two instances agree but at a near-tie: each token the original chose is an
        # argmax of the reloaded model's logits on the original's continuation, to 1e-4
        assert gen.shape == ref["gen"].shape and torch.equal(gen[:, :9], ref["ids"][:1])
        step_logits = m(input_ids=ref["gen"]).logits[0, 8:-1]
        chosen = step_logits.gather(-1, ref["gen"][0, 9:, None])[:, 0]
        assert (chosen >= step_logits.max(-1).values - 1e-4).all(), (gen, ref["gen"])
        tok = AutoTokenizer.from_pretrained("exp", trust_remote_code=True)
        assert tok.eos_token_id == 0 and tok.pad_token_id == 1

        m2 = AutoModelForCausalLM.from_pretrained("init", trust_remote_code=True)
        assert m2.dtype == torch.bfloat16 and m2.config.mtp_k == 2 and m2.config.vocab_size == 1024
        tok2 = AutoTokenizer.from_pretrained("init", trust_remote_code=True)
        batch = tok2(["To be, or not to be"], return_tensors="pt")
        out = m2(**batch, labels=batch["input_ids"])
        assert torch.isfinite(out.loss) and out.mtp_losses.shape == (1,)
        print("OK", m.config.hidden_size, m.config.num_hidden_layers)
    """, tmp_path)
    assert "OK 64 2" in r.stdout


def test_plain_save_pretrained_loads_with_automodel_without_qovaryx(tmp_path):
    """`save_pretrained` alone (no export_pretrained) writes an auto_map with AutoModel too."""
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=300, mtp_k=1)).eval()
    model.save_pretrained(tmp_path / "plain")
    auto_map = json.loads((tmp_path / "plain" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "config.QovaryxConfig", "AutoModel": "model.QovaryxModel",
                        "AutoModelForCausalLM": "model.QovaryxForCausalLM"}
    ids = torch.randint(8, 300, (2, 7))
    last = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    torch.save({"ids": ids, "last": last.detach()}, tmp_path / "ref.pt")
    r = run_clean("""
        import json
        import torch
        from transformers import AutoModel
        ref = torch.load("ref.pt")
        m = AutoModel.from_pretrained("plain", trust_remote_code=True).eval()
        assert type(m).__name__ == "QovaryxModel", type(m)
        torch.testing.assert_close(m(input_ids=ref["ids"]).last_hidden_state, ref["last"], rtol=1e-5, atol=1e-5)
        m.save_pretrained("again")  # the trunk alone, re-saved from the bundled code
        print("OK", sorted(json.load(open("again/config.json"))["auto_map"]))
    """, tmp_path)
    assert "OK ['AutoConfig', 'AutoModel', 'AutoModelForCausalLM']" in r.stdout


def test_debug_model_overfits_one_real_sentence(austen_path, tok_dir):
    from qovaryx_model.hf import load_hf_tokenizer

    text = " ".join(austen_path.read_text(encoding="utf-8").split())
    # the corpus's first sentence of 15 to 25 words (whatever prose the fixture gave)
    sentence = next(m.group() for m in re.finditer(r"[A-Z][^.!?]*[.!?]", text) if 15 <= len(m.group().split()) <= 25)
    tok = load_hf_tokenizer(tok_dir)
    ids = torch.tensor([[0] + tok(sentence)["input_ids"]])  # <|endoftext|> then the sentence
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = model(input_ids=ids, labels=ids)
        first = first if first is not None else out.loss.item()
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if out.lm_loss.item() < 0.02 and out.mtp_loss.item() < 0.05:
            break
    assert out.lm_loss.item() < 0.05 and first > 5.0
    model.eval()
    gen = model.generate(ids[:, :2], max_new_tokens=ids.shape[1] - 2, do_sample=False, eos_token_id=None)
    assert tok.decode(gen[0, 1:]) == sentence


def test_tied_head_round_trip_in_process(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = QovaryxConfig.from_preset("debug", vocab_size=300, tie_embeddings=True, ffn_kind="ternary_swiglu", mtp_k=1)
    model = QovaryxForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_pretrained(model, tmp_path / "tied")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    ids = torch.randint(8, 300, (2, 10))
    torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_init_with_the_project_tokenizer(tmp_path, small_tokenizer):
    """`qovaryx-train init` on a folder written by qovaryx_data.train_bpe (the real pipeline)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qovaryx_model.hf import init_scratch_base

    out = init_scratch_base("debug", small_tokenizer, tmp_path / "m", mtp_k=2)
    for f in small_tokenizer.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.config.vocab_size == len(tok) == 2048
    assert (model.config.eos_token_id, model.config.pad_token_id) == (tok.eos_token_id, tok.pad_token_id) == (0, 1)
    batch = tok(["Now is the winter of our discontent"], return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss) and out.mtp_losses.shape == (1,)
