"""The trainer end to end on packed real plays: it learns, it accumulates token-exactly, it resumes
bit-exactly (also after kill -9), it follows the curriculum, it checkpoints in the HF format."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer_util import REPO, metrics, pack_texts, step_counts, step_grads, steps, write_recipe


@pytest.fixture(scope="module")
def plays(tmp_path_factory, shakespeare_files, small_tokenizer) -> Path:
    """Eight real plays packed with a 2,048-token tokenizer, a validation split held out."""
    out = tmp_path_factory.mktemp("packed") / "plays"
    return pack_texts(shakespeare_files[:8], small_tokenizer, out, validation=0.25)


@pytest.fixture(scope="module")
def poems(tmp_path_factory, shakespeare_files, small_tokenizer) -> Path:
    """Four other works, for blending."""
    out = tmp_path_factory.mktemp("packed") / "poems"
    return pack_texts(shakespeare_files[-4:], small_tokenizer, out) 


def run_train(tmp_path, name, data, **keys):
    from qovaryx_model.trainer import train

    recipe = write_recipe(tmp_path / f"{name}.yaml", **{k: v for k, v in keys.items() if not k.startswith("_")})
    return train(recipe, data, out=tmp_path / name, progress=False, max_steps=keys.get("_max_steps"),
                 resume=keys.get("_resume", False))


def test_debug_recipe_learns_below_unigram_entropy(tmp_path, plays):
    """The shipped debug recipe (with the 2,048-token test tokenizer) ends more than 1 nat below the
    unigram entropy of the validation data, and its checkpoint loads with transformers."""
    from transformers import AutoModelForCausalLM

    from qovaryx_data import PackedDataset
    from qovaryx_model.trainer import train
    from qovaryx_model.trainer.data import unigram_entropy

    res = train(REPO / "pipelines" / "recipes" / "debug.yaml", plays, out=tmp_path / "run", progress=False,
                overrides={"save_every": 0})
    val = PackedDataset(plays / "val")
    h1 = unigram_entropy(val, 2048)
    assert res.val_loss is not None and res.val_loss < h1 - 1.0, (res.val_loss, h1)
    rows = metrics(res.out)
    evals = [r for r in rows if r.get("eval")]
    assert [r["step"] for r in evals] == [100, 200, 300] and 0 < evals[-1]["val_bpb"] < 8
    # bits per byte against bytes counted another way: the scored targets decoded by `tokenizers`
    import math

    from tokenizers import Tokenizer

    from qovaryx_model.trainer.data import BatchLoader, eval_plans

    tok = Tokenizer.from_file(str(val.tokenizer_dir / "tokenizer.json"))
    nbytes = ntargets = 0
    for plan in eval_plans(val, 128, 16_384, 1024):
        labels = BatchLoader([val], None, False).load(plan)["labels"][:, 1:]
        for row in labels:
            ids = row[row != -100].tolist()
            ntargets += len(ids)
            nbytes += len(tok.decode(ids, skip_special_tokens=True).encode("utf-8"))
    assert ntargets == evals[-1]["val_tokens"]
    want = evals[-1]["val_loss"] * ntargets / math.log(2) / nbytes
    assert evals[-1]["val_bpb"] == pytest.approx(want, rel=2e-3)  # decode may mend a character cut at a window edge
    train_rows = [r for r in rows if not r.get("eval")]
    assert [r["step"] for r in train_rows] == list(range(1, 301))
    assert {"lm_loss", "mtp_loss", "grad_norm", "lr", "tokens_per_s", "data_wait", "data_order_fingerprint",
            "seq_len", "peak_mem_mb"} <= set(train_rows[-1])
    assert res.loss_png is not None and res.loss_png.stat().st_size > 1000
    m = AutoModelForCausalLM.from_pretrained(res.checkpoint, trust_remote_code=True)
    assert type(m).__name__ == "QovaryxForCausalLM" and m.config.vocab_size == 2048
    assert (res.checkpoint / "tokenizer.json").is_file() and (res.checkpoint / "trainer_state.pt").is_file()
    state = torch.load(res.checkpoint / "trainer_state.pt", weights_only=True)  # no arbitrary unpickling
    assert set(state) == {"optimizer", "schedule", "sampler", "rng"}


def test_accumulation_gives_the_whole_batch_gradients(plays):
    """grad_accum 4 with step-wide counts == one batch of all sequences (assert_close), with micro-
    batches holding different numbers of targets (padding, document ends)."""
    from qovaryx_data import PackedDataset
    from qovaryx_data.collate import collate, text_window
    from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
    from qovaryx_model.trainer.data import mask_first_tokens

    ds = PackedDataset(plays / "train")
    ends = ds.doc_offsets[1:4]
    # windows across document ends and of different lengths (right padding in the batch)
    starts = [int(ends[0]) - 20, 100, int(ends[1]) - 5, 2000, int(ends[2]) - 30, 3000, 4000, 5000]
    lengths = [33, 33, 20, 33, 33, 11, 33, 27]
    examples = [text_window(ds, s, n) for s, n in zip(starts, lengths)]
    torch.manual_seed(0)
    model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=2048, mtp_k=3))
    whole = mask_first_tokens(collate(examples, pad_to=33))
    micro = [mask_first_tokens(collate(examples[i:i + 2], pad_to=33)) for i in range(0, 8, 2)]
    assert len({int(model.loss_counts(**b)["lm"]) for b in micro}) > 1  # unequal target counts

    g1, l1 = step_grads(model, [whole], None)
    g4, l4 = step_grads(model, micro, step_counts(model, micro))
    assert l4 == pytest.approx(l1, rel=1e-5) and set(g4) == set(g1)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-4, atol=1e-6, msg=n)
    # without the counts each micro-batch is its own mean: the sum is ~4x and the gradients differ
    _, l_naive = step_grads(model, micro, None)
    assert l_naive > 3 * l1


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_resume_is_bit_exact(tmp_path, plays, poems, optimizer):
    """Stopped at step 3 and resumed: every later step logs exactly the uninterrupted run's losses
    and data-order fingerprint, across a curriculum switch (step 5), a blend and accumulation."""
    data = [{"path": str(plays / "train"), "weight": 2}, {"path": str(poems), "weight": 1}]
    keys = dict(optimizer=optimizer, length_curriculum="(32,5)(64,-1)", target_tokens=8 * 2048, save_every=0)
    full = run_train(tmp_path, "full", data, **keys)
    part = run_train(tmp_path, "part", data, **keys, _max_steps=3)
    assert part.step == 3 and part.checkpoint.name == "step-00000003"
    again = run_train(tmp_path, "part", data, **keys, eval_every=2, _resume=True)  # eval_every may change
    a, b = steps(full.out), steps(again.out)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert (x["loss"], x["lm_loss"], x["mtp_loss"], x["data_order_fingerprint"], x["seq_len"]) == \
               (y["loss"], y["lm_loss"], y["mtp_loss"], y["data_order_fingerprint"], y["seq_len"]), x["step"]
    assert [r["seq_len"] for r in a] == [32] * 5 + [64] * 3


def test_resume_after_kill_9(tmp_path, plays):
    """kill -9 between checkpoints: --resume continues from the last complete one, and the losses
    after it equal an uninterrupted run's. Both runs go through the same CLI in a fresh process with
    the same environment (threads included): the same computation repeated, so `==`."""
    keys = dict(target_tokens=24 * 2048, save_every=2)  # 20 steps after the kill's trigger: it lands mid-run
    recipe = write_recipe(tmp_path / "k.yaml", **keys)

    def cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "qovaryx_model.trainer", "--recipe", str(recipe), "--data", str(plays),
                "--out", str(out), "--no-progress"]

    ref = subprocess.run(cmd(tmp_path / "full"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    def latest_step() -> int:  # the checkpoint `latest` names (replaced atomically once a folder is complete)
        p = out / "checkpoints" / "latest"
        return int(p.read_text().strip().split("-")[1]) if p.is_file() else 0

    while time.time() < deadline and latest_step() < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = (out / "checkpoints" / "latest").read_text().strip()
    done = int(latest.split("-")[1])
    assert 4 <= done < 24, latest
    r = subprocess.run(cmd(out) + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    a = {x["step"]: x for x in steps(tmp_path / "full")}
    b = steps(out)
    assert [x["step"] for x in b] == list(range(1, 25))
    assert "[train] 24 steps" in r.stderr and "checkpoint" in r.stderr  # the closing summary
    for y in b:
        x = a[y["step"]]
        assert (y["loss"], y["data_order_fingerprint"]) == (x["loss"], x["data_order_fingerprint"])


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path, plays):
    recipe = write_recipe(tmp_path / "s.yaml", target_tokens=400 * 2048, save_every=0)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qovaryx_model.trainer", "--recipe", str(recipe), "--data",
                             str(plays), "--out", str(out), "--no-progress"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and steps(out)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{steps(out)[-1]['step']:08d}" and int(latest[5:]) < 400


def test_curriculum_keeps_tokens_per_step_and_switches_on_time(tmp_path, plays):
    """seq_len in metrics.jsonl is the stage length the sampler planned; each step's micro-batches hold
    tokens_per_batch tokens at the stage's length, and the switches come at the stages' steps."""
    from qovaryx_data import PackedDataset
    from qovaryx_model.trainer.data import Sampler
    from qovaryx_model.trainer.recipe import load_recipe

    keys = dict(length_curriculum=[[16, 2], [32, 4], [64, -1]], target_tokens=6 * 2048)
    res = run_train(tmp_path, "c", plays, **keys)
    rows = steps(res.out)
    assert [r["seq_len"] for r in rows] == [16, 16, 32, 32, 64, 64]
    assert all(b["tokens"] - a["tokens"] == 2048 for a, b in zip(rows, rows[1:]))
    sampler = Sampler([PackedDataset(plays / "train")], [1.0], load_recipe(tmp_path / "c.yaml"), 0)
    for want in [16, 16, 32, 32, 64, 64]:
        micro = sampler.plan_step()
        assert len(micro) == 2 and all(set(m[:, 3]) == {want} and len(m) * want == 1024 for m in micro)
    # every sequence has seq_len targets unless a document starts inside it: 2 x 1,024 targets a step
    assert all(1900 < r["targets"] <= 2048 for r in rows)


def test_init_from_starts_from_the_weights(tmp_path, plays, small_tokenizer):
    """--init-from a `qovaryx-train init` folder: the first step's loss is the folder's model's loss
    on that batch (same weights), not a fresh init's; the optimizer and schedule start anew."""
    from qovaryx_model.hf import init_scratch_base

    base = init_scratch_base("debug", small_tokenizer, tmp_path / "base", seed=123, mtp_k=2)
    a = run_train(tmp_path, "fresh", plays, target_tokens=2048, seed=0)
    from qovaryx_model.trainer import train

    b = train(write_recipe(tmp_path / "i.yaml", target_tokens=2048, seed=0), plays, out=tmp_path / "init",
              init_from=base, progress=False)
    la, lb = steps(a.out)[0]["lm_loss"], steps(b.out)[0]["lm_loss"]
    assert la != lb  # other weights ...
    assert steps(a.out)[0]["data_order_fingerprint"] == steps(b.out)[0]["data_order_fingerprint"]  # ... same data
    # and a checkpoint is a valid --init-from too
    c = train(write_recipe(tmp_path / "j.yaml", target_tokens=2048), plays, out=tmp_path / "again",
              init_from=b.checkpoint, progress=False)
    assert c.step == 1


def test_checkpoints_keep_the_newest_and_latest_points_at_one(tmp_path, plays):
    res = run_train(tmp_path, "k", plays, target_tokens=6 * 2048, save_every=1, keep_checkpoints=2)
    names = sorted(p.name for p in (res.out / "checkpoints").glob("step-*"))
    assert names == ["step-00000005", "step-00000006"]
    assert (res.out / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert not list((res.out / "checkpoints").glob(".*tmp*"))


def test_tensorboard_logs_the_metrics(tmp_path, plays):
    """tensorboard: true writes out/tensorboard with every numeric training and validation metric of
    metrics.jsonl, at its step."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qovaryx_model.trainer import train

    res = train(write_recipe(tmp_path / "r.yaml", tensorboard=True, target_tokens=4 * 2048, eval_every=2,
                             save_every=0), plays, out=tmp_path / "o", progress=False)
    acc = EventAccumulator(str(res.out / "tensorboard"))
    acc.Reload()
    rows = steps(res.out)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # stored as float32
    tags = set(acc.Tags()["scalars"])
    assert {"train/lm_loss", "train/grad_norm", "train/lr", "train/tokens_per_s", "val/val_loss"} <= tags
    assert [e.step for e in acc.Scalars("val/val_loss")] == [2, 4]
