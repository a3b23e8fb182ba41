"""The model card's "nanoGPT-style 200-line training loop you can run today".

    python -m pipelines.train_quickstart --data build/packed/shakespeare/train \
        --tokenizer build/tokenizer --steps 200 [--val-data build/packed/shakespeare/val] [--out DIR]

A teaching file: one loop you can read in one sitting, over a packed dataset (`PackedDataset`),
with the Qovaryx model, AdamW, bf16 autocast on a GPU, and the multi-token-prediction (MTP) loss
the model computes itself when given `labels`. It is NOT the trainer. For everything else --
recipes (pipelines/recipes/), gradient accumulation with exact token-count normalisation, length
curriculum, decision head and image rows, adamw_8bit, checkpoints and resume, multi-GPU with
torchrun, metrics and evaluation -- use the trainer:

    qovaryx-train train --recipe pipelines/recipes/<recipe>.yaml --data build/packed/shakespeare --out build/run

(docs/TRAINING.md). The loop below is the card's minimal loop, with a batch sampler in front of it
and a learning-rate schedule inside it:

    for step, batch in enumerate(loader):
        with torch.amp.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad()
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qovaryx_data import PackedDataset
from qovaryx_data.collate import collate, random_window_starts, text_window, window_starts
from qovaryx_model import QovaryxConfig, QovaryxForCausalLM
from qovaryx_model.hf import export_pretrained, load_hf_tokenizer


# --- data: random windows of text, nanoGPT style ------------------------------------------------
def batches(ds: PackedDataset, batch_size: int, seq_len: int, seed: int):
    """An endless stream of batches of `batch_size` windows of `seq_len + 1` tokens (the model
    shifts the labels itself, so a window of L + 1 tokens gives L next-token targets). Windows are
    drawn uniformly from the runs of text-only rows; each carries document ids, so attention
    never crosses from one play into the next."""
    rng = np.random.default_rng(seed)
    while True:
        starts = random_window_starts(ds.text_spans, seq_len + 1, batch_size, rng)
        yield collate([text_window(ds, s, seq_len + 1) for s in starts])


@torch.no_grad()
def evaluate(model, ds: PackedDataset, seq_len: int, device, amp, max_windows: int = 64) -> float:
    """Mean next-token loss (nats/token) over the first `max_windows` non-overlapping windows."""
    model.eval()
    starts = window_starts(ds.text_spans, seq_len + 1)[:max_windows]
    total = count = 0.0
    for i in range(0, len(starts), 8):
        batch = collate([text_window(ds, s, seq_len + 1) for s in starts[i:i + 8]])
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp():
            out = model(**batch)
        n = model.loss_counts(batch["labels"], batch["attention_mask"], batch["document_ids"])["lm"].item()
        total += out.lm_loss.item() * n  # lm_loss is this batch's mean over its n next-token targets
        count += n
    model.train()
    return total / max(count, 1.0)


# --- the learning-rate schedule: linear warmup, then cosine down to lr/10 -----------------------
def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --- the loop -----------------------------------------------------------------------------------
def train(data: str | Path, tokenizer: str | Path | None = None, *, steps: int = 200, batch_size: int = 8,
          seq_len: int = 256, lr: float = 2e-3, warmup: int = 20, preset: str = "debug", mtp_k: int = 4,
          val_data: str | Path | None = None, eval_every: int = 50, save_to: str | Path | None = None,
          seed: int = 0, device: str | None = None, log_every: int = 10) -> dict:
    """Train a fresh `preset` model for `steps` steps on the packed dataset `data`; return the
    history {"loss": [...], "lm_loss": [...], "val_loss": [(step, loss), ...], "tokens_per_s": x}.
    `tokenizer` defaults to the copy stored inside the dataset; `save_to` exports the result."""
    torch.manual_seed(seed)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 autocast on a GPU (the weights and optimizer state stay fp32); plain fp32 on a CPU.
    amp = (lambda: torch.amp.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" \
        else contextlib.nullcontext

    ds = PackedDataset(data, tokenizer=tokenizer)  # refuses a dataset packed with another tokenizer
    tok = load_hf_tokenizer(tokenizer or ds.tokenizer_dir)
    val = PackedDataset(val_data, tokenizer=tokenizer) if val_data else None

    # The model: a preset from the card, sized to the tokenizer; MTP-K heads on by default.
    config = QovaryxConfig.from_preset(preset, vocab_size=len(tok), mtp_k=mtp_k,
                                       max_seq_len=max(seq_len + 1, mtp_k + 1))
    model = QovaryxForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {preset}, {n_params:,} parameters, mtp_k={mtp_k}; data: {len(ds):,} documents, "
          f"{ds.num_tokens:,} tokens; device: {device}", flush=True)

    # AdamW as on the card; no weight decay on norms and biases (1-D tensors), as nanoGPT does.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")

    history = {"loss": [], "lm_loss": [], "val_loss": []}
    model.train()
    t0, tokens = time.perf_counter(), 0
    for step, batch in enumerate(batches(ds, batch_size, seq_len, seed)):
        if step >= steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with amp():
            # The batch carries `labels` (the card's labels=batch["input_ids"], with -100 at padding):
            # the model shifts them, masks padding and document boundaries, and returns
            # loss = next-token loss + mtp_weight * mean(MTP depth losses).
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

        tokens += int(batch["attention_mask"].sum())
        history["loss"].append(out.loss.item())
        history["lm_loss"].append(out.lm_loss.item())
        if step % log_every == 0 or step == steps - 1:
            mtp = f" mtp {out.mtp_loss.item():.3f}" if out.mtp_loss is not None else ""
            print(f"step {step:5d}  loss {out.loss.item():.4f}  (next-token {out.lm_loss.item():.3f}{mtp})  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {tokens / (time.perf_counter() - t0):,.0f} tok/s", flush=True)
        if val is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            v = evaluate(model, val, seq_len, device, amp)
            history["val_loss"].append((step + 1, v))
            print(f"step {step + 1:5d}  val next-token loss {v:.4f}", flush=True)

    history["tokens_per_s"] = tokens / (time.perf_counter() - t0)
    if save_to is not None:  # a folder that AutoModelForCausalLM.from_pretrained(save_to, trust_remote_code=True) loads
        export_pretrained(model.cpu().float(), save_to, tokenizer=tokenizer or ds.tokenizer_dir)
        print(f"saved -> {save_to}")
    return history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a packed dataset folder (holding dataset.json)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the copy inside the dataset)")
    p.add_argument("--val-data", help="a packed validation dataset folder (optional)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--preset", default="debug", help="debug, 50m, 350m or 1b")
    p.add_argument("--mtp-k", type=int, default=4, help="tokens predicted per position (1 = no MTP)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", help="export the trained model to this folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.batch_size < 1 or a.seq_len < 1:
        p.error("--steps, --batch-size and --seq-len must be positive")
    train(a.data, a.tokenizer, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr,
          warmup=a.warmup, preset=a.preset, mtp_k=a.mtp_k, val_data=a.val_data, eval_every=a.eval_every,
          save_to=a.out, seed=a.seed, device=a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
