"""Learning quality: the Qovaryx decoder against a GPT-2-style baseline of the same size and budget.

Setting (issue 9): d_model 256, 6 layers, 4 query / 4 key-value heads, SwiGLU d_ff 686 (4,737,280
non-embedding parameters; the GPT-2 model has 4,739,072), tied head, mtp_k 1, vocabulary 20,242
(a BPE trained with qovaryx_data.train_bpe on the training plays), context 256, batch 8, 128 steps
(262,144 training tokens), AdamW (0.9, 0.95), weight decay 0.1 on matrices only (no decay on 1-D
parameters nor on embeddings), linear warmup 10 steps then cosine to 0.1x lr, clipping 1.0, fp32.
Corpus: the Shakespeare works of ../shared/corpora; every 7th work (sorted by name) is held out for
validation. Both models see the same windows (context + 1 tokens) in the same order.

The baseline is nanoGPT's architecture: learned absolute positions, LayerNorm with bias, GELU MLP 4x,
biases in every Linear, tied head, GPT-2 init (normal 0.02, residual projections 0.02/sqrt(2 n_layer)).

The loop has the trainer's math (qovaryx_model/trainer): the loss is the model's `lm_loss`.
Optimizers: `adamw`, or `muon` (qovaryx_model.muon: Muon on the trunk's matrices, AdamW on the rest).

    python benchmarks/bench_learning.py --quick     # one comparison: baseline vs the chosen defaults
    python benchmarks/bench_learning.py             # lr sweeps, 2-seed confirmation, knobs, MTP-K, 4x tokens

Every run prints its validation loss (nats/token, bits/byte), its time and step-time ratio; each
process uses one torch thread (the machine is shared). The tokenized corpus is cached under build/.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO.parent / "shared" / "corpora" / "shakespeare"
CACHE = REPO / "build" / "bench_learning"

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM  # noqa: E402
from qovaryx_model.config import LEARNING_DEFAULTS  # noqa: E402

VOCAB = 20242
SHAPE = dict(d_model=256, n_layer=6, n_head=4, n_kv_head=4, d_ff=686, tie_embeddings=True, mtp_k=1,
             max_seq_len=512, vocab_size=VOCAB)
CONTEXT, BATCH, STEPS, WARMUP, MIN_LR, WD, BETAS, CLIP = 256, 8, 128, 10, 0.1, 0.1, (0.9, 0.95), 1.0
VAL_WINDOWS = 96
DEVICE = "cpu"  # --device


# ---------------------------------------------------------------------------------------------
# data: train a BPE on the training works, tokenize once, cache as .npy
# ---------------------------------------------------------------------------------------------
def split_files() -> tuple[list[Path], list[Path]]:
    files = sorted(CORPUS.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"no Shakespeare works under {CORPUS} (needs ../shared beside the repo)")
    val = [f for i, f in enumerate(files) if i % 7 == 3]
    return [f for f in files if f not in val], val


def load_corpus() -> dict:
    """Token streams of the training and validation works (each work followed by EOS = 0)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    meta_path = CACHE / "corpus.json"
    train_files, val_files = split_files()
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") == "qovaryx-bench-learning-corpus" and meta.get("version") == 1 \
                and meta["train_files"] == [f.name for f in train_files]:
            return {"train": np.load(CACHE / "train.npy"), "val": np.load(CACHE / "val.npy"), **meta}
    from qovaryx_data import load_tokenizer, train_bpe
    from qovaryx_data.tokenizer import EOS_TOKEN

    tok_dir = CACHE / "tokenizer"
    train_bpe([str(f) for f in train_files], tok_dir, vocab_size=VOCAB, force=True, progress=False)
    tok = load_tokenizer(tok_dir)  # a tokenizers.Tokenizer
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    eos = tok.token_to_id(EOS_TOKEN)

    def stream(files):
        ids = []
        for f in files:
            ids += tok.encode(f.read_text(encoding="utf-8"), add_special_tokens=False).ids + [eos]
        return np.asarray(ids, dtype=np.int32)

    train, val = stream(train_files), stream(val_files)
    val_bytes = sum(len(f.read_bytes()) for f in val_files)
    meta = {"format": "qovaryx-bench-learning-corpus", "version": 1, "train_files": [f.name for f in train_files],
            "val_files": [f.name for f in val_files], "val_bytes_per_token": val_bytes / len(val)}
    np.save(CACHE / "train.npy", train)
    np.save(CACHE / "val.npy", val)
    meta_path.write_text(json.dumps(meta, indent=1))
    return {"train": train, "val": val, **meta}


def windows(stream: np.ndarray, n: int, seed: int) -> torch.Tensor:
    """n windows of CONTEXT + 1 tokens: non-overlapping, in a seeded random order (epochs repeat)."""
    per_epoch = len(stream) // (CONTEXT + 1)
    rows = stream[: per_epoch * (CONTEXT + 1)].reshape(per_epoch, CONTEXT + 1)
    g = np.random.default_rng(seed)
    order = np.concatenate([g.permutation(per_epoch) for _ in range(math.ceil(n / per_epoch))])[:n]
    return torch.from_numpy(rows[order].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# the GPT-2-style baseline (nanoGPT)
# ---------------------------------------------------------------------------------------------
class GPT2Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, vocab=VOCAB, d=256, n_layer=6, n_head=4, block_size=CONTEXT + 1):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block_size, d)
        self.h = nn.ModuleList(GPT2Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, input_ids, labels):
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        tgt = torch.full_like(labels, -100)
        tgt[:, :-1] = labels[:, 1:]
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)

    def non_embedding_params(self) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(("wte", "wpe")))


def qovaryx_non_embedding(model: QovaryxForCausalLM) -> int:
    """Trunk blocks + final norm (no embedding, head or MTP depths)."""
    return sum(p.numel() for p in model.model.layers.parameters()) + sum(p.numel() for p in model.model.norm.parameters())


# ---------------------------------------------------------------------------------------------
# the loop (the trainer's math)
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, steps: int) -> float:
    """Linear warmup over WARMUP steps, then cosine from 1 to MIN_LR at the last step."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - 1 - WARMUP)
    return MIN_LR + (1 - MIN_LR) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, name: str, lr: float, embed_lr_mult: float = 1.0, matrix_lr_mult: float = 1.0):
    from qovaryx_model.muon import build_optimizer as build

    return build(model, name, lr=lr, weight_decay=WD, betas=BETAS, embed_lr_mult=embed_lr_mult,
                 matrix_lr_mult=matrix_lr_mult)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """The next-token loss: what is scored."""
    if isinstance(model, GPT2):
        return model(batch, batch)
    # CONTEXT + 1 tokens in, labels unshifted: CONTEXT targets (the last position predicts nothing)
    return model(input_ids=batch, labels=batch).lm_loss


def train_loss(model, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(the objective to minimize, its next-token part): with mtp_k > 1 the objective adds the MTP
    depths' losses (mtp_weight x their mean), as the trainer's does; with mtp_k 1 it is the lm loss."""
    if isinstance(model, GPT2):
        loss = model(batch, batch)
        return loss, loss.item()
    out = model(input_ids=batch, labels=batch)
    return out.loss, out.lm_loss.item()


@torch.no_grad()
def evaluate(model, val: torch.Tensor) -> float:
    model.eval()
    losses = [lm_loss(model, val[i:i + BATCH]).item() for i in range(0, len(val), BATCH)]
    model.train()
    return float(np.mean(losses))


def make_model(kind: str, seed: int, **cfg):
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2()
    return QovaryxForCausalLM(QovaryxConfig(**{**SHAPE, **cfg}))


def run(kind: str, corpus: dict, lr: float, seed: int = 0, steps: int = STEPS, optimizer: str = "adamw",
        embed_lr_mult: float = 1.0, matrix_lr_mult: float = 1.0, label: str = "", **cfg) -> dict:
    model = make_model(kind, seed, **cfg).to(DEVICE)
    opt = build_optimizer(model, optimizer, lr, embed_lr_mult, matrix_lr_mult)
    data = windows(corpus["train"], steps * BATCH, seed).to(DEVICE)
    val = windows(corpus["val"], VAL_WINDOWS, 1234).to(DEVICE)
    t0 = time.perf_counter()
    train_losses = []
    for step in range(steps):
        f = lr_factor(step, steps)
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * f
        loss, next_token = train_loss(model, data[step * BATCH:(step + 1) * BATCH])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_losses.append(next_token)
    seconds = time.perf_counter() - t0
    v = evaluate(model, val)
    non_emb = model.non_embedding_params() if isinstance(model, GPT2) else qovaryx_non_embedding(model)
    total = sum(p.numel() for p in model.parameters())
    r = {"label": label or kind, "kind": kind, "lr": lr, "seed": seed, "steps": steps, "optimizer": optimizer,
         "embed_lr_mult": embed_lr_mult, "matrix_lr_mult": matrix_lr_mult, "cfg": cfg, "val_loss": v,
         "val_bpb": v / math.log(2) / corpus["val_bytes_per_token"],
         "train_loss_last10": float(np.mean(train_losses[-10:])), "seconds": seconds, "step_s": seconds / steps,
         "non_embedding": non_emb, "total": total}
    print(f"  {r['label']:<34} lr {lr:<8.2g} seed {seed} steps {steps:>4}: val {v:.4f} nats ({r['val_bpb']:.4f} bpb)"
          f"  train {r['train_loss_last10']:.3f}  {seconds:6.1f}s ({r['step_s']:.3f} s/step)", flush=True)
    with open(CACHE / "runs.jsonl", "a") as fh:
        fh.write(json.dumps(r) + "\n")
    return r


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------
# The candidate Qovaryx settings, each a config field or an optimizer choice (docs/MODEL.md).
GPT2_INIT = dict(initializer="normal", initializer_range=0.02, residual_init="scaled")
KNOBS: dict[str, dict] = {
    "xavier (card)": dict(initializer="xavier", residual_init="none"),
    "normal + scaled": dict(GPT2_INIT),
    "normal + zero out-proj": dict(GPT2_INIT, residual_init="zero"),
    "+ qk_norm": dict(GPT2_INIT, qk_norm=True),
    "+ softcap 30": dict(GPT2_INIT, logit_softcap=30.0),
    "+ untied head": dict(GPT2_INIT, tie_embeddings=False),
    "+ embedding lr x5": dict(GPT2_INIT, embed_lr_mult=5.0),
    "+ muon (matrix lr x4)": dict(GPT2_INIT, optimizer="muon", matrix_lr_mult=4.0),
    "+ muon (matrix lr x4) + qk_norm": dict(GPT2_INIT, qk_norm=True, optimizer="muon", matrix_lr_mult=4.0),
    "+ muon (matrix lr x4) + embedding lr x5": dict(GPT2_INIT, optimizer="muon", matrix_lr_mult=4.0, embed_lr_mult=5.0),
}
LRS = (7e-4, 1.4e-3, 2.8e-3)
# the knobs that change the compute of a step (the initializers do not)
TIMED = ("+ qk_norm", "+ softcap 30", "+ untied head")
# What --quick and the protocol call "defaults": the presets' LEARNING_DEFAULTS + the chosen optimizer
# (Muon on the hidden matrices at 4x the lr, AdamW on the rest: docs/MODEL.md has the measurements).
DEFAULTS = dict(LEARNING_DEFAULTS, optimizer="muon", matrix_lr_mult=4.0)
BEST_LR = {"gpt2": 1.4e-3, "qovaryx": 2.8e-3}  # each model's best of its sweep (docs/MODEL.md)


def run_spec(corpus, spec: dict) -> dict:
    spec = dict(spec)
    kind = spec.pop("kind", "qovaryx")
    return run(kind, corpus, **spec)


def summarize(baseline: list[dict], rows: dict[str, list[dict]]) -> None:
    b = float(np.mean([r["val_loss"] for r in baseline]))
    bs = float(np.mean([r["step_s"] for r in baseline]))
    print(f"\n{'setting':<36} {'val loss':>9} {'ratio':>7} {'spread':>7} {'step time':>9}")
    print(f"{'gpt2 baseline':<36} {b:9.4f} {1:7.3f} {np.ptp([r['val_loss'] for r in baseline]):7.4f} {1:8.2f}x")
    for name, rs in rows.items():
        v = [r["val_loss"] for r in rs]
        print(f"{name:<36} {np.mean(v):9.4f} {np.mean(v) / b:7.3f} {np.ptp(v):7.4f} "
              f"{np.mean([r['step_s'] for r in rs]) / bs:8.2f}x")


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["val_loss"])


def full_protocol(corpus: dict, lrs=LRS, four_x: bool = True) -> None:
    """lr sweep of both at seed 0; the best lr of each at seed 1; every knob alone and combined at the
    Qovaryx best lr; MTP-K=4 against K=1; the chosen setting against the baseline at 4x the tokens."""
    print("\n[1] lr sweep, seed 0")
    g_sweep = [run("gpt2", corpus, lr, label="gpt2") for lr in lrs]
    q_sweep = [run("qovaryx", corpus, lr, label="qovaryx defaults", **DEFAULTS) for lr in lrs]
    g_lr, q_lr = best(g_sweep)["lr"], best(q_sweep)["lr"]
    print(f"\n[2] best lr at a second seed (gpt2 {g_lr:g}, qovaryx {q_lr:g})")
    base = [best(g_sweep), run("gpt2", corpus, g_lr, seed=1, label="gpt2")]
    ours = [best(q_sweep), run("qovaryx", corpus, q_lr, seed=1, label="qovaryx defaults", **DEFAULTS)]
    print("\n[3] each knob at the Qovaryx best lr, seed 0")
    rows = {"defaults (2 seeds)": ours}
    for name, knob in KNOBS.items():
        # AdamW knobs at the baseline's best AdamW lr, Muon ones at the Qovaryx sweep's best
        rows[name] = [run_spec(corpus, {"lr": q_lr if knob.get("optimizer") == "muon" else g_lr, "label": name,
                                        **knob})]
    print("\n[4] MTP-K=4 against K=1 (only the next-token head is scored)")
    rows["defaults, mtp_k=4"] = [run("qovaryx", corpus, q_lr, label="defaults mtp_k=4", **{**DEFAULTS, "mtp_k": 4})]
    summarize(base, rows)
    if four_x:
        print("\n[5] 4x the tokens (512 steps), seed 0")
        b4 = [run("gpt2", corpus, g_lr, steps=4 * STEPS, label="gpt2 4x")]
        summarize(b4, {"defaults 4x": [run("qovaryx", corpus, q_lr, steps=4 * STEPS, label="defaults 4x",
                                           **DEFAULTS)]})


def table(path: Path = CACHE / "runs.jsonl") -> str:
    """A markdown table of every run recorded in runs.jsonl, grouped by (label, lr, steps): mean
    validation loss over seeds, seed spread (max - min), ratio to the GPT-2 baseline at the same
    steps (its best lr's mean), and the runs' wall seconds per step (they depend on what else ran:
    --step-time measures the ratios)."""
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["lr"], r["steps"]), []).append(r)

    def mean(rs, key):
        return float(np.mean([r[key] for r in rs]))

    base = {}  # steps -> the baseline group with the lowest mean validation loss
    for (label, lr, steps), rs in groups.items():
        if rs[0]["kind"] == "gpt2" and (steps not in base or mean(rs, "val_loss") < mean(base[steps], "val_loss")):
            base[steps] = rs
    out = ["| setting | lr | steps | seeds | val loss (nats) | bpb | ratio | seed spread | train loss | s/step (wall) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (label, lr, steps), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], mean(kv[1], "val_loss"))):
        b = base.get(steps)
        ratio = f"{mean(rs, 'val_loss') / mean(b, 'val_loss'):.3f}" if b else "–"
        st = f"{mean(rs, 'step_s'):.2f}"
        spread = f"{np.ptp([r['val_loss'] for r in rs]):.4f}" if len(rs) > 1 else "–"
        out.append(f"| {label} | {lr:g} | {steps} | {len(rs)} | {mean(rs, 'val_loss'):.4f} | {mean(rs, 'val_bpb'):.4f} | "
                   f"{ratio} | {spread} | {mean(rs, 'train_loss_last10'):.3f} | {st} |")
    return "\n".join(out)


def step_times(corpus: dict, specs: dict[str, dict], steps: int = 6, rounds: int = 3) -> None:
    """Seconds per optimizer step of each setting against the baseline, measured in this process
    in interleaved rounds (baseline, A, B, ..., baseline, A, B, ...; `steps` timed steps each after
    2 untimed), median per setting: the ratio is what a knob costs in wall-clock on this machine."""
    data = windows(corpus["train"], (steps + 2) * BATCH, 0).to(DEVICE)
    built = {}
    for name, spec in {"gpt2": {"kind": "gpt2"}, **specs}.items():
        spec = dict(spec)
        kind, opt_name = spec.pop("kind", "qovaryx"), spec.pop("optimizer", "adamw")
        mults = {k: spec.pop(k) for k in ("embed_lr_mult", "matrix_lr_mult") if k in spec}
        spec.pop("lr", None), spec.pop("label", None), spec.pop("seed", None), spec.pop("steps", None)
        model = make_model(kind, 0, **spec).to(DEVICE)
        built[name] = (model, build_optimizer(model, opt_name, 1e-3, **mults))
    times: dict[str, list[float]] = {n: [] for n in built}
    for _ in range(rounds):
        for name, (model, opt) in built.items():
            for i in range(steps + 2):
                t0 = time.perf_counter()
                train_loss(model, data[i * BATCH:(i + 1) * BATCH])[0].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
    b = float(np.median(times["gpt2"]))
    print(f"\n{'setting':<36} {'s/step':>8} {'ratio':>7}")
    for name, ts in times.items():
        print(f"{name:<36} {np.median(ts):8.3f} {np.median(ts) / b:6.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one comparison: baseline vs the defaults, 1 seed")
    ap.add_argument("--run", help="one run given as JSON, e.g. '{\"kind\": \"gpt2\", \"lr\": 1.4e-3}'")
    ap.add_argument("--table", action="store_true", help="print the markdown table of build/bench_learning/runs.jsonl")
    ap.add_argument("--step-time", action="store_true",
                    help="step time of every knob against the baseline, interleaved in one process")
    ap.add_argument("--steps", type=int, default=6, help="--step-time: timed steps per setting and round")
    ap.add_argument("--rounds", type=int, default=3, help="--step-time: interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-4x", action="store_true", help="skip the confirmation at 4x the tokens")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (fp32: TF32 stays off)")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    torch.set_num_threads(args.threads)
    if args.table:
        print(table())
        return
    corpus = load_corpus()
    print(f"corpus: {len(corpus['train']):,} training tokens ({len(corpus['train_files'])} works), "
          f"{len(corpus['val']):,} validation tokens ({len(corpus['val_files'])} works), "
          f"{VAL_WINDOWS * CONTEXT:,} scored; {corpus['val_bytes_per_token']:.3f} bytes/token")
    if args.step_time:
        step_times(corpus, {"adamw, normal + scaled": dict(LEARNING_DEFAULTS), **{k: KNOBS[k] for k in TIMED},
                            "defaults (muon)": DEFAULTS, "defaults (muon), mtp_k=4": dict(DEFAULTS, mtp_k=4)},
                   steps=args.steps, rounds=args.rounds)
        return
    if args.run:
        run_spec(corpus, json.loads(args.run))
        return
    if args.quick:
        base = [run("gpt2", corpus, BEST_LR["gpt2"], label="gpt2")]
        rows = {"defaults": [run("qovaryx", corpus, BEST_LR["qovaryx"], label="qovaryx defaults", **DEFAULTS)]}
        summarize(base, rows)
        return
    full_protocol(corpus, four_x=not args.no_4x)


if __name__ == "__main__":
    main()
