"""`make demo`'s report: BUILD/demo/report.md and the same as a self-contained report.html (the
loss curve embedded), built from one list of blocks so the two never disagree."""
from __future__ import annotations

import base64
import html
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_report(out: Path, corpus: dict, packed: dict, trained: dict, samples: dict,
                 seconds: dict[str, tuple[float, bool]], *, recipe: Path, argv: list[str] | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    png = out / "loss.png"
    if trained.get("loss_png") and Path(trained["loss_png"]).exists():
        shutil.copyfile(trained["loss_png"], png)
    blocks = _blocks(corpus, packed, trained, samples, seconds, recipe, argv, png)
    md, page = _markdown(blocks), _html(blocks, png)
    for path, text in ((out / "report.md", md), (out / "report.html", page)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return {"report": str(out / "report.md"), "html": str(out / "report.html")}


def _blocks(corpus, packed, trained, samples, seconds, recipe, argv, png) -> list[tuple]:
    va = packed["val"]
    gap = va["unigram_entropy"] - trained["val_loss"]
    args = " ".join(argv or [])
    b: list[tuple] = [
        ("h1", "Qovaryx demo: raw text to a trained model"),
        ("p", f"{corpus['what']}: tokenized with a {packed['vocab_size']:,}-token byte-level BPE, packed once into "
              f"memory-mapped shards, trained with `qovaryx-train train` ({trained['steps']} steps, "
              f"{trained['tokens']:,} tokens), and loaded back through `transformers`."),
        ("h2", "Result"),
        ("table", ["", "nats/token"], [
            ["validation loss (next token)", f"{trained['val_loss']:.3f}"],
            ["unigram entropy of the validation data", f"{va['unigram_entropy']:.3f}"],
            ["below the unigram entropy by", f"{gap:.3f}"],
            ["training loss, first step -> last step", f"{trained['first_loss']:.3f} -> {trained['last_loss']:.3f}"],
        ] + ([["bits per byte (validation)", f"{trained['val_bpb']:.3f}"]] if trained.get("val_bpb") else [])),
        ("p", "The unigram entropy is what a model that knows only how often each token occurs reaches; "
              "everything below it was learned from context."),
    ]
    if png.exists():
        b.append(("img", "loss.png", "training and validation loss against tokens"))
    b += [
        ("h2", "Data"),
        ("table", ["", "documents", "tokens", "shards"], [
            [split, f"{packed[split]['documents']:,}", f"{packed[split]['tokens']:,}", str(packed[split]["shards"])]
            for split in ("train", "val")]),
        ("p", f"Corpus: {corpus['bytes'] / 1e6:.1f} MB in {len(corpus['files'])} files. Packed dataset: "
              f"`{packed['out']}`."),
        ("h2", "Stages"),
        ("table", ["stage", "seconds", ""], [[name, f"{s:.1f}", "up to date (time when built)" if skipped else ""]
                                          for name, (s, skipped) in seconds.items()]),
        ("p", f"Training throughput: {trained['tokens_per_s']:,.0f} tokens/s; the loader's share of step time: "
              f"{100 * trained['data_wait']:.2f}%."),
        ("h2", "Samples"),
        ("p", f"{samples['model_class']} ({samples['parameters']:,} parameters) loaded with "
              f"`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`; {samples['settings']}."),
    ]
    for s in samples["samples"]:
        b.append(("sample", s["prompt"], s["greedy"], s["sampled"]))
    ckpt = trained["checkpoint"]
    b += [
        ("h2", "Reproduce and use"),
        ("code", "bash", f"make demo{' DEMO_ARGS=' + repr(args) if args else ''}          # this run; a second run takes seconds\n"
                         "make demo DEMO_ARGS='--force train'  # retrain (and redo what depends on it)\n"
                         f"qovaryx-train train --recipe {recipe.relative_to(REPO)} --data {packed['out']} --out build/my-run"),
        ("p", f"The recipe, `{recipe.relative_to(REPO)}`:"),
        ("code", "yaml", recipe.read_text(encoding="utf-8").strip()),
        ("p", "Load the result anywhere, with or without qovaryx installed:"),
        ("code", "python", "import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                           f"path = {ckpt!r}\n"
                           "tok = AutoTokenizer.from_pretrained(path)\n"
                           "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
                           "ids = tok(\"To be, or not to be\", return_tensors=\"pt\")\n"
                           "print(tok.decode(model.generate(**ids, max_new_tokens=40)[0]))"),
        ("p", "Next: your own corpus (`qovaryx-data train-bpe`, a manifest, `qovaryx-data pack`), the card's "
              "recipes in `pipelines/recipes/` (50m, 350m, 1b), multi-GPU with `torchrun --nproc_per_node N -m "
              "qovaryx_model.trainer ...`; see docs/TRAINING.md."),
        ("p", f"Python {sys.version.split()[0]}; the trainer's metrics: `{trained['metrics']}`."),
    ]
    return b


def _markdown(blocks) -> str:
    lines: list[str] = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h1":
            lines += [f"# {blk[1]}", ""]
        elif kind == "h2":
            lines += [f"## {blk[1]}", ""]
        elif kind == "p":
            lines += [blk[1], ""]
        elif kind == "table":
            head, rows = blk[1], blk[2]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        elif kind == "img":
            lines += [f"![{blk[2]}]({blk[1]})", ""]
        elif kind == "code":
            lines += [f"```{blk[1]}", blk[2], "```", ""]
        elif kind == "sample":
            _, prompt, greedy, sampled = blk
            lines += [f"**{prompt.strip()}**", "", "greedy:", "", "> " + _quote(prompt + greedy), "",
                      "sampled:", "", "> " + _quote(prompt + sampled), ""]
    return "\n".join(lines)


def _quote(text: str) -> str:
    return text.strip().replace("\n", "  \n> ")


def _html(blocks, png: Path) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Qovaryx demo</title><style>"
             "body{font:15px/1.5 system-ui,sans-serif;max-width:860px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             "pre{background:#f6f6f6;padding:.8em;overflow-x:auto}blockquote{white-space:pre-wrap;border-left:3px solid #bbb;"
             "margin:.3em 0 .8em;padding-left:.8em;font-family:Georgia,serif}img{max-width:100%}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{e(blk[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(blk[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in blk[1])
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in blk[2])
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        elif kind == "img" and png.exists():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<img alt='{e(blk[2])}' src='data:image/png;base64,{data}'>")
        elif kind == "code":
            parts.append(f"<pre><code>{e(blk[2])}</code></pre>")
        elif kind == "sample":
            _, prompt, greedy, sampled = blk
            parts.append(f"<p><b>{e(prompt.strip())}</b></p><p>greedy:</p><blockquote>{e(prompt + greedy)}</blockquote>"
                         f"<p>sampled:</p><blockquote>{e(prompt + sampled)}</blockquote>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """`code` spans of a paragraph as <code>, the rest escaped."""
    pieces = text.split("`")
    return "".join(f"<code>{html.escape(p)}</code>" if i % 2 else html.escape(p) for i, p in enumerate(pieces))
