"""The trainer beyond one process and one loss: DDP under torchrun (gloo, 2 CPU processes), HF's
Trainer with accumulation, FLOPs per token against torch's FlopCounterMode, the sampler's rank split,
and the patch encoder + decision head learning Fashion-MNIST from the pixels."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer_util import REPO, TINY, pack_texts, steps, write_recipe


@pytest.fixture(scope="module")
def plays(tmp_path_factory, shakespeare_files, small_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("packed") / "plays"
    return pack_texts(shakespeare_files[:4], small_tokenizer, out)


@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, plays, distributed):
    """torchrun --nproc_per_node 2 (gloo): per-step losses and gradient norms equal a single process
    with the same global batch, the data order is the same, and (DDP) the ranks' weights stay
    identical; (FSDP2) the gathered checkpoint resumes."""
    from qovaryx_model.trainer import train

    recipe = write_recipe(tmp_path / "r.yaml", target_tokens=4 * 2048, grad_accum_steps=2, save_every=2,
                          distributed=distributed)
    single = train(recipe, plays, out=tmp_path / "one", progress=False)
    env = {**os.environ, "QOVARYX_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), str(REPO / "tests" / "ddp_probe.py"), str(recipe),
                        str(plays), str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = steps(single.out), steps(tmp_path / "two")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["data_order_fingerprint"] == y["data_order_fingerprint"] and x["targets"] == y["targets"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5) and y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-4)
    ranks = json.loads((tmp_path / "two" / "ranks.json").read_text())
    if distributed == "ddp":
        assert ranks[0] == ranks[1]  # bitwise: DDP applies the same averaged gradients on every rank
    else:
        assert ranks[0] != ranks[1]  # each rank holds its own shard
    # the checkpoint two ranks wrote loads into one process and continues like the single run
    from transformers import AutoModelForCausalLM

    two_ckpt = tmp_path / "two" / "checkpoints" / "step-00000004"
    a_w = AutoModelForCausalLM.from_pretrained(single.checkpoint, trust_remote_code=True).state_dict()
    b_w = AutoModelForCausalLM.from_pretrained(two_ckpt, trust_remote_code=True).state_dict()
    # AdamW divides by sqrt(v): a weight whose gradient is near zero moves by up to ~lr per step on a
    # rounding difference (the ranks' all-reduce sums in another order, with other thread counts),
    # e.g. 1 embedding element of 131,072 by 1.5e-5 after 4 steps at lr 3e-3; a missing step or shard
    # moves nearly every element by ~lr, far beyond 1e-4
    for k in a_w:
        torch.testing.assert_close(b_w[k], a_w[k], rtol=1e-4, atol=1e-4, msg=k)
        assert float((b_w[k] - a_w[k]).abs().median()) < 1e-6, k


def test_ranks_read_disjoint_micro_batches_whose_union_is_the_single_plan(plays):
    from qovaryx_data import PackedDataset
    from qovaryx_model.trainer import load_recipe
    from qovaryx_model.trainer.data import PlanStream, Sampler

    recipe = load_recipe(mapping={**TINY, "grad_accum_steps": 4, "length_curriculum": "(32,2)(64,-1)"})
    ds = [PackedDataset(plays)]

    def plans(rank, world, n):
        it = iter(PlanStream(Sampler(ds, [1.0], recipe, 0), rank, world))
        return [next(it) for _ in range(n)]

    one = plans(0, 1, 16)  # 4 steps of 4 micro-batches
    r0, r1 = plans(0, 2, 8), plans(1, 2, 8)
    key = lambda p: (p["step"], p["micro"])  # noqa: E731
    assert sorted(map(key, r0 + r1)) == sorted(map(key, one))
    assert not set(map(key, r0)) & set(map(key, r1))
    by_key = {key(p): p["entries"] for p in one}
    for p in r0 + r1:
        assert np.array_equal(p["entries"], by_key[key(p)])
    # without replacement within an epoch: no window piece is served twice
    pieces = [tuple(e[[1, 2, 3]]) for p in one for e in p["entries"]]
    assert len(pieces) == len(set(pieces))


def test_epochs_cover_every_window_once_in_a_new_order(plays):
    """Without replacement within an epoch, reshuffled (seeded by epoch) at the next: the first n
    draws are every item once, the next n are every item once again in another order."""
    from qovaryx_data import PackedDataset
    from qovaryx_model.trainer.data import Source

    src = Source(PackedDataset(plays), 0, 64, seed=0)
    first = [src.next() for _ in range(src.n)]
    second = [src.next() for _ in range(src.n)]
    assert src.epoch == 1 and len(set(first)) == src.n == len(first)
    assert sorted(first) == sorted(second) and first != second
    again = Source(PackedDataset(plays), 0, 64, seed=0)
    assert [again.next() for _ in range(2 * again.n)] == first + second  # deterministic from the seed


def test_blend_follows_the_weights_and_resumes_mid_epoch(plays, tmp_path, shakespeare_files, small_tokenizer):
    from qovaryx_data import PackedDataset
    from qovaryx_model.trainer import load_recipe
    from qovaryx_model.trainer.data import Sampler

    other = PackedDataset(pack_texts(shakespeare_files[4:6], small_tokenizer, tmp_path / "other"))
    recipe = load_recipe(mapping=TINY)
    s = Sampler([PackedDataset(plays), other], [3.0, 1.0], recipe, 7)
    for _ in range(5):
        s.plan_step()
    assert abs(s.counts[0] / s.counts.sum() - 0.75) < 0.05
    saved = s.state_dict()
    later = [s.plan_step() for _ in range(3)]
    t = Sampler([PackedDataset(plays), other], [3.0, 1.0], recipe, 7)
    t.load_state_dict(saved)
    again = [t.plan_step() for _ in range(3)]
    assert all(np.array_equal(a, b) for x, y in zip(later, again) for a, b in zip(x, y))
    assert s.fingerprint == t.fingerprint


@pytest.mark.parametrize("kind", ["swiglu", "routed_lowrank_swiglu", "lowrank_swiglu"])
def test_flops_per_token_matches_torch_flop_counter(kind):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
    from qovaryx_model.trainer.metrics import flops_per_token

    cfg = QovaryxConfig.from_preset("debug", vocab_size=2048, mtp_k=3, ffn_kind=kind, ffn_top_k=1)
    model = QovaryxForCausalLM(cfg)
    B, T = 2, 128
    ids = torch.randint(8, 2048, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the fused CPU kernel reports 0
        model(input_ids=ids, labels=ids).loss.backward()
    measured = fc.get_total_flops() / (B * T)
    assert flops_per_token(cfg, T) == pytest.approx(measured, rel=0.05), (flops_per_token(cfg, T), measured)


def test_hf_trainer_with_accumulation_matches_one_batch(tmp_path, plays):
    """transformers.Trainer passes num_items_in_batch; the model divides by it, so accumulation 2 of
    batch 2 gives the gradients and logged loss of accumulation 1 of batch 4 (was 2.000x)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from qovaryx_data import PackedDataset
    from qovaryx_data.collate import collate, text_window, window_starts
    from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
    from qovaryx_model.trainer.data import mask_first_tokens

    ds = PackedDataset(plays)
    starts = window_starts(ds.text_spans, 33, stride=32)[:4]
    rows = [text_window(ds, int(s), n) for s, n in zip(starts, (33, 20, 33, 27))]  # unequal targets

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    def collator(examples):
        b = mask_first_tokens(collate(examples, pad_to=33))
        return {k: b[k] for k in ("input_ids", "labels", "attention_mask", "document_ids")}

    def run(batch, accum):
        torch.manual_seed(0)
        model = QovaryxForCausalLM(QovaryxConfig.from_preset("debug", vocab_size=2048, mtp_k=1))
        grads = {}

        class Capture(Trainer):
            def _clip_grad_norm(self, *a, **k):  # transformers calls this right before optimizer.step
                grads.update({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
                return super()._clip_grad_norm(*a, **k)

        args = TrainingArguments(output_dir=str(tmp_path / f"hf{accum}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accum, max_steps=1, learning_rate=0.0,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                 dataloader_drop_last=False, max_grad_norm=1e9)
        tr = Capture(model=model, args=args, train_dataset=Rows(), data_collator=collator)
        tr.train()
        loss = [h["loss"] for h in tr.state.log_history if "loss" in h][0]
        return grads, loss

    g1, l1 = run(4, 1)
    g2, l2 = run(2, 2)
    assert g1 and set(g1) == set(g2)
    assert l2 == pytest.approx(l1, rel=1e-4), (l1, l2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-7, msg=n)


def test_torchrun_cli_stops_every_rank_when_one_gets_sigterm(tmp_path, plays):
    """`torchrun -m qovaryx_model.trainer` (the CLI under torchrun, 2 gloo ranks): SIGTERM to one rank
    only (a preempted node, say) stops both at the same step: they agree on the stop, save one
    checkpoint together and exit 0, and the summary names it."""
    import signal
    import time

    import psutil

    recipe = write_recipe(tmp_path / "r.yaml", target_tokens=400 * 2048, grad_accum_steps=2, save_every=0)
    out = tmp_path / "run"
    env = {**os.environ, "QOVARYX_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(29600 + os.getpid() % 1000), "-m", "qovaryx_model.trainer", "--recipe", str(recipe),
                             "--data", str(plays), "--out", str(out), "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def whole_lines() -> int:  # a line being written is not parsed
            p = out / "metrics.jsonl"
            return p.read_text().count("\n") if p.exists() else 0

        deadline = time.time() + 180
        while time.time() < deadline and whole_lines() < 2:
            time.sleep(0.05)
        ranks = [c for c in psutil.Process(proc.pid).children(recursive=True)
                 if "qovaryx_model.trainer" in " ".join(c.cmdline())]
        assert len(ranks) == 2, [c.cmdline() for c in ranks]
        ranks[1].send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # a hang (the ranks disagreeing) must not outlive the test
            for c in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                c.kill()
    assert proc.returncode == 0, stderr[-3000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    done = steps(out)[-1]["step"]
    assert latest == f"step-{done:08d}" and 2 <= done < 400
    assert f"[train] {done} steps" in stderr and latest in stderr
