"""pipelines/train_quickstart.py, the card's short loop: a few steps on a tiny packed slice of the
real plays lower the loss, the CLI runs, and the exported folder loads through transformers."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import yaml

from pipelines.train_quickstart import evaluate, lr_at, main, train
from qovaryx_data.packer import pack


def _pack_plays(tmp_path, files, tokenizer):
    m = {"name": "plays", "tokenizer": str(tokenizer), "output": str(tmp_path / "packed"),
         "sources": [{"path": str(f), "format": "text", "split": "file"} for f in files]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(m), encoding="utf-8")
    pack(tmp_path / "m.yaml", workers=1, progress=False)
    return tmp_path / "packed"


def test_loss_falls_and_the_export_loads(tmp_path, shakespeare_files, small_tokenizer):
    data = _pack_plays(tmp_path, shakespeare_files[:2], small_tokenizer)
    hist = train(data, steps=40, batch_size=4, seq_len=64, lr=3e-3, warmup=5, mtp_k=2, val_data=data,
                 eval_every=40, save_to=tmp_path / "model", log_every=100, device="cpu")
    loss = np.array(hist["lm_loss"])
    assert len(loss) == 40 and np.isfinite(hist["loss"]).all()
    assert abs(loss[0] - math.log(2048)) < 0.5             # random init: about ln(vocab)
    assert loss[-5:].mean() < loss[:5].mean() - 1.0, loss   # it learns (unigram statistics at least)
    (step, val), = hist["val_loss"]
    assert step == 40 and val < loss[0] - 1.0

    from transformers import AutoModelForCausalLM

    from qovaryx_data import PackedDataset

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    assert model.config.vocab_size == 2048 and model.config.mtp_k == 2
    again = evaluate(model, PackedDataset(data), 64, torch.device("cpu"), contextlib.nullcontext)
    assert again == pytest.approx(val, abs=1e-4)          # the saved weights are the trained ones


def test_cli_runs_a_few_steps(tmp_path, shakespeare_files, small_tokenizer, capsys):
    data = _pack_plays(tmp_path, shakespeare_files[:1], small_tokenizer)
    assert main(["--data", str(data), "--tokenizer", str(small_tokenizer), "--steps", "3", "--batch-size", "2",
                 "--seq-len", "32", "--mtp-k", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model: debug" in out and "step     2  loss" in out and "mtp" not in out.split("step     2")[1]


def test_schedule_warms_up_then_decays_to_a_tenth():
    lrs = [lr_at(s, 100, 1.0, 10) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and abs(lrs[-1] - 0.1) < 1e-3
