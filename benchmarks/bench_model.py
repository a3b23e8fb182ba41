"""CPU benchmark of qovaryx_model against transformers' LlamaForCausalLM of the same shape.

Prints ratios measured in this run (higher tokens/s ratio = we are faster):
  1. training step (forward + backward) tokens/s, ours with MTP off (mtp_k=1) vs Llama   (goal >= 1.0x)
  2. cost of MTP-K=4 on top: step time mtp_k=4 / mtp_k=1
  3. greedy decode tokens/s with a KV cache, ours vs Llama                              (goal >= 1.0x)
  4. step time of each FFN backend / swiglu                            (goal: ternary <= 1.5x)

    .venv/bin/python benchmarks/bench_model.py            # about 1 minute (one thread, CPU time)
    .venv/bin/python benchmarks/bench_model.py --quick    # smaller repeat counts
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qovaryx_model import QovaryxConfig, QovaryxForCausalLM

from gpu_check import step_flops  # same folder; FLOP count of one training step

SHAPE = dict(d_model=256, n_layer=4, n_head=8, n_kv_head=2, d_ff=704, vocab_size=8192)


def ours(**kw) -> QovaryxForCausalLM:
    return QovaryxForCausalLM(QovaryxConfig(**{**SHAPE, "max_seq_len": 2048, "ffn_rank": 64, **kw}))


def llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layer"],
                      num_attention_heads=SHAPE["n_head"], num_key_value_heads=SHAPE["n_kv_head"],
                      intermediate_size=SHAPE["d_ff"], vocab_size=SHAPE["vocab_size"], max_position_embeddings=2048,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def time_all(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Fastest CPU seconds (`time.process_time`) per call of each function, measured round-robin.

    CPU time rather than wall time, with one torch thread, because this box is shared: other jobs
    deschedule us (wall time grows) but do not add to our CPU time. Round-robin and the minimum
    (as in `timeit`) absorb what remains (cache contention)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[k].append(time.process_time() - t0)
    return {k: min(v) for k, v in times.items()}


def train_step(model, ids):
    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
    return step


def decode(model, prompt, n_new):
    def run():
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 pad_token_id=1, eos_token_id=None)
        assert out.shape[1] == prompt.shape[1] + n_new
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: CPU time then equals compute time; 0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    torch.manual_seed(0)
    ids = torch.randint(8, SHAPE["vocab_size"], (args.batch, args.seq))
    print(f"shape {SHAPE}, batch {args.batch} x seq {args.seq}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; times are CPU seconds (process_time), fastest of round-robin runs")

    ntok = ids.numel()
    base, q1 = llama().train(), ours(mtp_k=1).train()
    # [1] paired with Llama, in three rounds so the spread shows how much is noise
    rounds = [time_all({"llama": train_step(base, ids), "ours": train_step(q1, ids)}, reps) for _ in range(3)]
    ratios = sorted(r["llama"] / r["ours"] for r in rounds)
    best = {k: min(r[k] for r in rounds) for k in ("llama", "ours")}
    print(f"\n[1] train step fwd+bwd: ours(mtp_k=1) {ntok / best['ours']:,.0f} tok/s, Llama {ntok / best['llama']:,.0f} "
          f"tok/s -> ratio ours/Llama = {ratios[1]:.2f}x (median of 3 rounds; range {ratios[0]:.2f}-{ratios[2]:.2f}) "
          f"(goal >= 1.0)")

    q4 = ours(mtp_k=4).train()
    t = time_all({"mtp1": train_step(q1, ids), "mtp4": train_step(q4, ids)}, reps)
    print(f"[2] MTP-K=4 cost: step time mtp_k=4 / mtp_k=1 = {t['mtp4'] / t['mtp1']:.2f}x "
          f"({ntok / t['mtp4']:,.0f} tok/s); this shape's head is as costly as its trunk, so for scale:")
    del q4
    f1, f4 = (step_flops(QovaryxConfig(**{**SHAPE, "mtp_k": k}), args.batch, args.seq) for k in (1, 4))
    print(f"    FLOP ratio mtp_k=4 / mtp_k=1 at this benchmark's shape: {f4 / f1:.2f}x")
    for preset in ("50m", "350m", "1b"):
        f1, f4 = (step_flops(QovaryxConfig.from_preset(preset, mtp_k=k), 1, 2048) for k in (1, 4))
        print(f"    FLOP ratio mtp_k=4 / mtp_k=1 for the {preset} preset at seq 2048: {f4 / f1:.2f}x")

    n_new = 64
    prompt = ids[:1, :32]
    base.eval(), q1.eval()
    d = time_all({"llama": decode(base, prompt, n_new), "ours": decode(q1, prompt, n_new)},
                 max(3, reps // 2), warmup=1)
    print(f"[3] greedy decode with KV cache (batch 1, prompt 32, {n_new} new): ours {n_new / d['ours']:,.0f} tok/s, "
          f"Llama {n_new / d['llama']:,.0f} tok/s -> ratio ours/Llama = {d['llama'] / d['ours']:.2f}x (goal >= 1.0)")
    del base

    print("[4] FFN backends, train step time vs swiglu (mtp_k=1), each paired with swiglu:")
    q1.train()
    for kind in ("ternary_swiglu", "lowrank_swiglu", "routed_lowrank_swiglu"):
        other = ours(mtp_k=1, ffn_kind=kind).train()
        t = time_all({"swiglu": train_step(q1, ids), kind: train_step(other, ids)}, reps)
        goal = " (goal <= 1.5; the card admits ~3x)" if kind == "ternary_swiglu" else ""
        print(f"    {kind:<22} {t[kind] / t['swiglu']:.2f}x{goal}")

if __name__ == "__main__":
    main()
