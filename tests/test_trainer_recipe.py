"""Recipes (the card's, and every kind of bad key) and the trainer's refusals, each naming the fix."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from trainer_util import RECIPES, TINY, pack_texts, steps, write_recipe


@pytest.fixture(scope="module")
def plays(tmp_path_factory, shakespeare_files, small_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("packed") / "plays"
    return pack_texts(shakespeare_files[:3], small_tokenizer, out, validation=0.34)


@pytest.mark.parametrize("name", ["debug", "50m", "350m", "1b"])
def test_shipped_recipes_load_and_describe_a_valid_model(name):
    from qovaryx_model import parameter_counts
    from qovaryx_model.trainer import load_recipe

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = load_recipe(RECIPES / f"{name}.yaml")
    cfg = r.model_config()
    counts = parameter_counts(cfg)  # built on the meta device: no memory
    assert counts["total"] > 0 and r.total_steps >= 1 and r.tokens_per_batch % r.stages[0].seq_len == 0
    capped = [str(x.message) for x in w if "capped" in str(x.message)]
    if name == "50m":  # the card's 50m recipe has max_seq_len 2048 and a 4096 stage: runs as written
        assert [(s.seq_len, s.until_step) for s in r.stages] == [(512, 1000), (1024, 3000), (2048, -1)]
        assert len(capped) == 1 and "4096" in capped[0] and "2048" in capped[0] and "50m.yaml" in capped[0]
        assert r.optimizer == "adamw_8bit" and cfg.attn_backend == "flash" and cfg.mtp_k == 4
        assert r.target_tokens == 500_000_000 and r.lr == 2e-4
    else:
        assert not capped
    if name == "350m":
        assert cfg.decision_head_enabled and cfg.ffn_kind == "ternary_swiglu" and r.class_weighted_decision
        assert cfg.calibration_loss_weight == 0.2 and cfg.decision_weight == 0.5
    if name == "1b":
        assert cfg.ffn_kind == "routed_lowrank_swiglu" and (cfg.ffn_rank, cfg.ffn_experts, cfg.ffn_top_k) == (128, 4, 1)


def test_curriculum_string_and_list_forms_agree():
    from qovaryx_model.trainer import Recipe

    a = Recipe(target_tokens=10**6, tokens_per_batch=4096, max_seq_len=4096,
               length_curriculum="(512,1000)(1024,3000)(2048,10000)(4096,-1)")
    b = Recipe(target_tokens=10**6, tokens_per_batch=4096, max_seq_len=4096,
               length_curriculum=[[512, 1000], [1024, 3000], {"seq_len": 2048, "until_step": 10000}, [4096, -1]])
    assert a.stages == b.stages
    assert [a.seq_len_at(s) for s in (0, 999, 1000, 2999, 3000, 9999, 10000, 10**6)] == \
           [512, 512, 1024, 1024, 2048, 2048, 4096, 4096]


BAD = [
    ({"tokens_per_batch": 1000}, "tokens_per_batch", "not divisible"),
    ({"length_curriculum": "(64,10)(32,-1)"}, "length_curriculum", "must increase"),
    ({"length_curriculum": "(16,10)(64,5)(64,-1)"}, "length_curriculum", "increase"),
    ({"length_curriculum": "(24,10)(64,-1)"}, "length_curriculum", "does not divide"),
    ({"length_curriculum": "(16,10)(64,20)"}, "length_curriculum", "run to the end"),
    ({"length_curriculum": "512,1000"}, "length_curriculum", "cannot read"),
    ({"lrr": 0.1}, "lrr", "not a recipe key"),
    ({"lr": "fast"}, "lr", "expected a number"),
    ({"lr": -1.0}, "lr", "positive"),
    ({"matrix_lr_mult": 0}, "matrix_lr_mult", "positive"),
    ({"grad_accum_steps": 2.5}, "grad_accum_steps", "integer"),
    ({"grad_accum_steps": 0}, "grad_accum_steps", ">= 1"),
    ({"mtp_weight": -0.3}, "mtp_weight", ">= 0"),
    ({"mtp_weight": float("nan")}, "mtp_weight", "finite"),
    ({"optimizer": "sgd"}, "optimizer", "adamw_8bit"),
    ({"mixed_precision": "fp8"}, "mixed_precision", "bf16 or fp32"),
    ({"target_tokens": "lots"}, "target_tokens", "500M"),
    ({"target_tokens": 0}, "target_tokens", "must be set"),
    ({"preset": "7b"}, "preset", "choose one of"),
    ({"min_lr": 1.0}, "min_lr", "[0, lr"),
    ({"betas": [0.9]}, "betas", "two numbers"),
    ({"compile": "yes"}, "compile", "true or false"),
    ({"ffn_kind": "dense"}, "ffn_kind", "choose one of"),
    ({"preset": ["debug"]}, "preset", "a string"),
    ({"optimizer": {"name": "adamw"}}, "optimizer", "a string"),
    ({"length_curriculum": "(32,0)(64,-1)"}, "length_curriculum", "ends before step 1"),
]


@pytest.mark.parametrize("change,key,fix", BAD, ids=[b[1] + "-" + b[2].split()[0] for b in BAD])
def test_bad_recipe_keys_name_the_key_and_the_file(tmp_path, change, key, fix):
    from qovaryx_model.trainer import RecipeError, load_recipe

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**TINY, **change}))
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert key in msg and str(path) in msg and fix in msg, msg


def test_cli_reports_a_bad_recipe_without_a_traceback(tmp_path, plays):
    from qovaryx_model.cli import main

    path = write_recipe(tmp_path / "bad.yaml", tokens_per_batch=1000)
    r = CliRunner().invoke(main, ["train", "--recipe", str(path), "--data", str(plays), "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "tokens_per_batch" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["train", "--recipe", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                  "--set", "tokens_per_batch=1024"])
    assert r.exit_code == 1 and "not a packed dataset" in r.output, r.output


def test_blend_weights_must_be_positive(tmp_path, plays):
    from qovaryx_model.trainer import TrainerError, train

    with pytest.raises(TrainerError, match="weight of .* must be > 0"):
        train(write_recipe(tmp_path / "r.yaml"), [{"path": str(plays / "train"), "weight": 0}], out=tmp_path / "o",
              progress=False)
    # the same blend given in the recipe: the message names the key and the file
    recipe = write_recipe(tmp_path / "d.yaml", data=[{"path": str(plays / "train"), "weight": -1}])
    with pytest.raises(TrainerError, match=r"recipe key 'data' in .*d\.yaml: weight of .* must be > 0"):
        train(recipe, out=tmp_path / "o2", progress=False)


def test_refuses_another_tokenizer(tmp_path, plays, shakespeare_files, tok_2k_other):
    """A blend of datasets with different tokenizers, and --init-from a model of another tokenizer."""
    from qovaryx_model.hf import init_scratch_base
    from qovaryx_model.trainer import TrainerError, train

    other = pack_texts(shakespeare_files[3:4], tok_2k_other, tmp_path / "other")
    recipe = write_recipe(tmp_path / "r.yaml")
    with pytest.raises(TrainerError, match="different tokenizers"):
        train(recipe, [str(plays / "train"), str(other)], out=tmp_path / "o", progress=False)
    base = init_scratch_base("debug", tok_2k_other, tmp_path / "base", mtp_k=2)
    with pytest.raises(TrainerError, match=r"has tokenizer .* packed with"):
        train(recipe, plays, out=tmp_path / "o2", init_from=base, progress=False)


@pytest.fixture(scope="module")
def tok_2k_other(tmp_path_factory, shakespeare_files) -> Path:
    from qovaryx_data import train_bpe

    out = tmp_path_factory.mktemp("tok") / "other"
    train_bpe([str(p) for p in shakespeare_files[20:23]], out=out, vocab_size=2048)
    return out


def test_init_from_refuses_a_recipe_of_another_shape(tmp_path, plays, small_tokenizer):
    from qovaryx_model.hf import init_scratch_base
    from qovaryx_model.trainer import TrainerError, train

    base = init_scratch_base("debug", small_tokenizer, tmp_path / "base", mtp_k=2)
    with pytest.raises(TrainerError, match=r"d_model \(64 there, 128 in the recipe\)"):
        train(write_recipe(tmp_path / "r.yaml", d_model=128), plays, out=tmp_path / "o", init_from=base,
              progress=False)


def test_resume_refuses_changed_math_but_not_logging_keys(tmp_path, plays, shakespeare_files, small_tokenizer):
    from qovaryx_model.trainer import TrainerError, train

    recipe = write_recipe(tmp_path / "r.yaml", target_tokens=4 * 2048)
    train(recipe, plays, out=tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(TrainerError, match=r"recipe key 'lr': checkpoint 0.003, now 0.001"):
        train(write_recipe(tmp_path / "r2.yaml", target_tokens=4 * 2048, lr=1e-3), plays, out=tmp_path / "run",
              resume=True, progress=False)
    with pytest.raises(TrainerError, match="datasets"):
        other = pack_texts(shakespeare_files[5:6], small_tokenizer, tmp_path / "other")
        train(recipe, other, out=tmp_path / "run", resume=True, progress=False)
    res = train(write_recipe(tmp_path / "r3.yaml", target_tokens=4 * 2048, eval_every=1, save_every=1), plays,
                out=tmp_path / "run", resume=True, max_steps=3, progress=False)
    assert res.step == 3 and [r["step"] for r in steps(tmp_path / "run")] == [1, 2, 3]


def test_adamw_8bit_falls_back_to_adamw_with_one_warning(tmp_path, plays, monkeypatch):
    """Where bitsandbytes cannot be imported, adamw_8bit trains with torch's AdamW and says so once."""
    from qovaryx_model.trainer import optim, train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    monkeypatch.setattr(optim, "_WARNED", set())
    with pytest.warns(UserWarning, match="adamw_8bit: bitsandbytes is unavailable") as w:
        res = train(write_recipe(tmp_path / "r.yaml", optimizer="adamw_8bit", target_tokens=2 * 2048), plays,
                    out=tmp_path / "o", progress=False)
    assert sum("adamw_8bit" in str(x.message) for x in w) == 1 and res.step == 2


def test_adamw_8bit_state_is_under_a_third_of_adamw(tmp_path):
    import torch

    from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
    from qovaryx_model.trainer import Recipe
    from qovaryx_model.trainer.optim import build_optimizer, optimizer_state_bytes

    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=2048, mtp_k=1))
    sizes = {}
    for name in ("adamw", "adamw_8bit"):
        opt = build_optimizer(model, Recipe(target_tokens=1, optimizer=name, max_seq_len=64), torch.device("cpu"))
        model(input_ids=torch.randint(8, 2048, (2, 16)), labels=torch.randint(8, 2048, (2, 16))).loss.backward()
        opt.step()
        opt.zero_grad()
        sizes[name] = optimizer_state_bytes(opt)
        assert type(opt).__name__ == ("AdamW8bit" if name == "adamw_8bit" else "AdamW")
    assert sizes["adamw_8bit"] <= 0.3 * sizes["adamw"], sizes


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, plays):
    from qovaryx_model.trainer import TrainerError, train

    recipe = write_recipe(tmp_path / "r.yaml", lr=1e4, min_lr=1e4, warmup_steps=0, grad_clip=0.0,
                          target_tokens=30 * 2048, save_every=0)
    with pytest.raises(TrainerError, match=r"the loss is (nan|inf).*no checkpoint was written yet"):
        train(recipe, plays, out=tmp_path / "o", progress=False)
    # with a checkpoint every step: the message names the last one (the weights that gave the loss, written
    # before it), and `latest` still points at it: nothing is written after a non-finite loss
    recipe = write_recipe(tmp_path / "s.yaml", lr=1e4, min_lr=1e4, warmup_steps=0, grad_clip=0.0,
                          target_tokens=30 * 2048, save_every=1, keep_checkpoints=2)
    with pytest.raises(TrainerError, match=r"step (\d+): the loss is (nan|inf).*the last checkpoint, "
                                           r".*step-(\d+), holds the weights that gave this loss.*--init-from") as e:
        train(recipe, plays, out=tmp_path / "s", progress=False)
    bad, good = (int(x) for x in re.search(r"step (\d+):.*step-(\d+)", str(e.value)).groups())
    assert good == bad - 1 >= 1
    assert (tmp_path / "s" / "checkpoints" / "latest").read_text().strip() == f"step-{good:08d}"


def test_activation_checkpointing_recomputes_the_same_step(tmp_path, plays):
    """activation_checkpointing: true recomputes each block in the backward: the same losses and
    gradient norms as without it (two computations: a tolerance)."""
    from qovaryx_model.trainer import train

    runs = [train(write_recipe(tmp_path / f"r{ac}.yaml", activation_checkpointing=ac, target_tokens=3 * 2048,
                               save_every=0), plays, out=tmp_path / f"o{ac}", progress=False) for ac in (False, True)]
    a, b = steps(runs[0].out), steps(runs[1].out)
    assert runs[1].model.model.gradient_checkpointing and not runs[0].model.model.gradient_checkpointing
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)


def test_bf16_weights_and_autocast_on_cpu_train(tmp_path, plays):
    """param_dtype bf16 with 8-bit AdamW and bf16 autocast (forced on CPU): the path the card's 1B uses
    on a 16 GB GPU runs, its losses stay finite and fall, and the checkpoint holds bf16 weights."""
    import json

    from qovaryx_model.trainer import train

    res = train(write_recipe(tmp_path / "r.yaml", param_dtype="bf16", optimizer="adamw_8bit", autocast_cpu=True,
                             target_tokens=6 * 2048, save_every=0), plays, out=tmp_path / "o", progress=False)
    rows = steps(res.out)
    assert all(r["loss"] == r["loss"] for r in rows) and rows[-1]["lm_loss"] < rows[0]["lm_loss"]
    assert json.loads((res.checkpoint / "config.json").read_text())["dtype"] == "bfloat16"


def test_muon_trains_and_resumes_exactly(tmp_path, plays):
    """optimizer: muon (Muon on the hidden matrices, AdamW on the rest): the loss falls, and a resumed
    run logs the uninterrupted run's losses exactly."""
    from qovaryx_model.trainer import train

    keys = dict(optimizer="muon", matrix_lr_mult=4.0, target_tokens=6 * 2048, save_every=0, lr=2e-3, min_lr=2e-4)
    full = train(write_recipe(tmp_path / "m.yaml", **keys), plays, out=tmp_path / "full", progress=False)
    opt = torch.load(full.checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    peaks = {g["group"]: g["initial_lr"] for part in ("muon", "adamw") for g in opt[part]["param_groups"]}
    assert peaks["matrix"] == pytest.approx(8e-3) and peaks["embedding"] == pytest.approx(2e-3), peaks
    train(write_recipe(tmp_path / "m.yaml", **keys), plays, out=tmp_path / "part", max_steps=3, progress=False)
    again = train(write_recipe(tmp_path / "m.yaml", **keys), plays, out=tmp_path / "part", resume=True, progress=False)
    a, b = steps(full.out), steps(again.out)
    assert a[-1]["lm_loss"] < a[0]["lm_loss"]
    assert [x["loss"] for x in a] == [y["loss"] for y in b]


def test_compile_runs_the_same_steps_as_eager(tmp_path, plays):
    """compile: true trains through torch.compile (inductor on CPU): the same losses as the eager run
    within a tolerance (two computations), and the compiled run's checkpoint holds plain weights."""
    from safetensors.torch import load_file

    import shutil

    from torch._dynamo.utils import counters

    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile's CPU backend (inductor) needs a C++ compiler")

    from qovaryx_model.trainer import train

    torch._dynamo.reset()
    counters.clear()
    runs = [train(write_recipe(tmp_path / f"r{c}.yaml", compile=c, target_tokens=3 * 2048, save_every=0), plays,
                  out=tmp_path / f"o{c}", progress=False) for c in (False, True)]
    assert counters["frames"]["ok"] > 0  # dynamo compiled the model's frames (only the second run asks)
    eager, compiled = steps(runs[0].out), steps(runs[1].out)
    assert len(compiled) == 3
    for x, y in zip(eager, compiled):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)  # inductor's kernels are another computation
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3)
    names = set(load_file(runs[1].checkpoint / "model.safetensors"))
    assert names == set(load_file(runs[0].checkpoint / "model.safetensors"))
    assert not any("_orig_mod" in n for n in names)


def test_a_validation_set_too_short_for_one_window_is_reported(tmp_path, plays, shakespeare_files, small_tokenizer):
    """Validation data without a single window of max_seq_len + 1 tokens: the run says so (naming the
    folder and the fix) instead of silently reporting no validation loss."""
    from qovaryx_model.trainer import train

    line = tmp_path / "one_line.txt"
    line.write_text(shakespeare_files[0].read_text(encoding="utf-8").strip().splitlines()[0] + "\n")
    short = pack_texts([line], small_tokenizer, tmp_path / "short")
    with pytest.warns(UserWarning, match=r"validation data .*short.* holds no window of 65 tokens.*--val-data"):
        res = train(write_recipe(tmp_path / "r.yaml", target_tokens=2048, save_every=0), plays, val_data=short,
                    out=tmp_path / "o", progress=False)
    assert res.val_loss is None


def test_the_logged_lr_is_warmup_then_cosine_to_min_lr(tmp_path, plays):
    """metrics.jsonl's lr, and the rate each optimizer group really used: linear warmup to lr, then
    cosine to min_lr at the last step; --max-steps stops early without changing the schedule. The
    trainer modules' docstring examples hold too."""
    import doctest
    import math

    from qovaryx_model.trainer import metrics as metrics_mod, optim, recipe as recipe_mod, train

    for mod in (optim, recipe_mod, metrics_mod):
        result = doctest.testmod(mod)
        assert result.attempted > 0 and result.failed == 0, mod.__name__
    keys = dict(lr=1e-3, min_lr=1e-4, warmup_steps=3, target_tokens=10 * 2048, save_every=0)
    res = train(write_recipe(tmp_path / "r.yaml", **keys), plays, out=tmp_path / "o", progress=False, max_steps=8)
    got = [r["lr"] for r in steps(res.out)]
    want = [1e-3 * (s + 1) / 3 if s < 3 else 1e-4 + 0.45e-3 * (1 + math.cos(math.pi * (s - 3) / 6)) for s in range(8)]
    assert got == pytest.approx(want, rel=1e-9) and got[2] == pytest.approx(1e-3)
    opt = torch.load(res.checkpoint / "trainer_state.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in opt["param_groups"]] == pytest.approx([want[-1]] * len(opt["param_groups"]))


def test_gradient_clipping_bounds_the_update(tmp_path, plays):
    """grad_clip scales the gradients before the step: clipped to 1e-12 (far below AdamW's eps), the
    first update barely moves the weights, while clip 0 (off) moves them by about lr per element."""
    from safetensors.torch import load_file

    from qovaryx_model.trainer import train
    from qovaryx_model.trainer.setup import build_model

    moved = {}
    for clip in (0.0, 1e-12):
        keys = dict(grad_clip=clip, weight_decay=0.0, warmup_steps=0, lr=1e-3, min_lr=1e-3, target_tokens=2048,
                    save_every=1, keep_checkpoints=2)
        res = train(write_recipe(tmp_path / f"c{clip}.yaml", **keys), plays, out=tmp_path / f"o{clip}",
                    progress=False)
        after = load_file(res.checkpoint / "model.safetensors")
        w0 = build_model(res.model.config, 0, torch.device("cpu"), None).state_dict()  # the trainer's init (seed 0)
        mats = [k for k in after if k.startswith("model.layers.") and after[k].dim() == 2]
        moved[clip] = max(float((after[k] - w0[k]).abs().mean()) for k in mats)
    assert moved[0.0] > 2e-4 and moved[1e-12] < 1e-6, moved
