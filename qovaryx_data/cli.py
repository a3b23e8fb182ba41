"""`qovaryx-data`: a thin CLI. Each command parses its options and calls one typed library function.

Library modules are imported inside the commands so `qovaryx-data --help` stays fast and light.
"""
from __future__ import annotations

import sys

import click

from qovaryx_data.errors import QovaryxDataError


class _Group(click.Group):
    """Turns a user-caused QovaryxDataError into a one-line message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QovaryxDataError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="qovaryx")
def main() -> None:
    """Train a byte-level BPE tokenizer and pack corpora into memory-mapped shards."""


# ---- train-bpe (qovaryx_data.tokenizer) ----

# Literal copies (checked equal by tests/test_tokenizer.py) so that `--help` imports nothing heavy.
_BPE_FORMATS = ("text", "jsonl", "jsonl.zst", "parquet", "hf")   # qovaryx_data.sources.FORMATS
_BPE_DEFAULT_VOCAB = 20242                                       # tokenizer.DEFAULT_VOCAB_SIZE
_BPE_DEFAULT_MIN_FREQ = 2                                        # tokenizer.DEFAULT_MIN_FREQUENCY


@main.command("train-bpe")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write tokenizer.json, tokenizer_config.json and "
                   "qovaryx_tokenizer.json to (created if missing).")
@click.option("--vocab-size", type=int, default=_BPE_DEFAULT_VOCAB, show_default=True,
              help="Total vocabulary entries, the 256 byte symbols and all special tokens included.")
@click.option("--min-frequency", type=int, default=_BPE_DEFAULT_MIN_FREQ, show_default=True,
              help="Fewest occurrences a pair needs to be merged. Lower it (1 is the lowest) when "
                   "a small corpus cannot reach --vocab-size.")
@click.option("--text-field", default="text", show_default=True,
              help="Field (.jsonl, .jsonl.zst) or column (.parquet, datasets folder) holding the text.")
@click.option("--split", type=click.Choice(["file", "line", "paragraph"]), default="file",
              show_default=True,
              help="How .txt inputs are cut into documents: one per file, per line, or per "
                   "blank-line-separated paragraph.")
@click.option("--format", "fmt", type=click.Choice(_BPE_FORMATS), default=None,
              help="Input format for all INPUTs; by default inferred from each file's extension "
                   "(.txt, .jsonl, .jsonl.zst, .parquet; a `save_to_disk` folder is 'hf').")
@click.option("--special-token", "special_tokens", multiple=True, metavar="TOKEN",
              help="An extra special token, given after the 8 fixed ones (ids 0-7: <|endoftext|>, "
                   "<|pad|>, ...); repeat for several. They count towards --vocab-size.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default="strict",
              show_default=True,
              help="Invalid UTF-8 in an input: 'strict' stops with an error naming the file, "
                   "'replace' substitutes U+FFFD.")
@click.option("--allow-smaller-vocab", is_flag=True,
              help="Keep a smaller vocabulary when the corpus cannot reach --vocab-size, "
                   "instead of failing.")
@click.option("--force", is_flag=True,
              help="Replace a different tokenizer already in --out (the same one is always fine).")
@click.option("--progress/--no-progress", default=None,
              help="Show the trainer's progress bars [default: when stderr is a terminal].")
def train_bpe_cmd(inputs, out, vocab_size, min_frequency, text_field, split, fmt, special_tokens,
                  errors, allow_smaller_vocab, force, progress) -> None:
    """Train a byte-level BPE tokenizer on INPUT... (files, folders or globs).

    Inputs are streamed; any string round-trips exactly. The output folder loads with
    transformers.AutoTokenizer.from_pretrained(OUT) without qovaryx installed.

    \b
    Example:
      qovaryx-data train-bpe corpus/*.txt --out build/tokenizer
    """
    from qovaryx_data.tokenizer import train_bpe

    r = train_bpe(list(inputs), out, vocab_size=vocab_size, min_frequency=min_frequency,
                  special_tokens=special_tokens, text_field=text_field, split=split, format=fmt,
                  errors=errors, allow_smaller_vocab=allow_smaller_vocab, force=force,
                  progress=progress)
    click.echo(f"wrote {r.out}: {r.vocab_size} tokens from {r.documents} documents "
               f"({r.characters:,} characters), hash {r.hash}")

# ---- pack / verify / inspect (qovaryx_data.pack, qovaryx_data.reader) ----


if __name__ == "__main__":
    main()
