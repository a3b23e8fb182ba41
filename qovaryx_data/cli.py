"""`qovaryx-data`: a thin CLI. Each command parses its options and calls one typed library function.

Heavy library modules are imported inside the commands so `qovaryx-data --help` stays fast and
light; the option choices and defaults come from modules that import nothing heavy.
"""
from __future__ import annotations

import itertools
import sys

import click

from qovaryx_data.errors import QovaryxDataError
from qovaryx_data.interop import FORMATS as INTEROP_FORMATS
from qovaryx_data.interop import SEPARATORS as INTEROP_SEPARATORS
from qovaryx_data.packing.executors import EXECUTORS
# light (no numpy, torch, datasets, pyarrow or tokenizers at import): the options' choices/defaults
from qovaryx_data.sources import FORMATS, SPLITS
from qovaryx_data.tokenizer import DEFAULT_MIN_FREQUENCY, DEFAULT_VOCAB_SIZE, ERRORS


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


@main.command("train-bpe")
@click.argument("inputs", nargs=-1, required=True, metavar="INPUT...")
@click.option("--out", required=True, type=click.Path(),
              help="Folder to write tokenizer.json, tokenizer_config.json and "
                   "qovaryx_tokenizer.json to (created if missing).")
@click.option("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, show_default=True,
              help="Total vocabulary entries, the 256 byte symbols and all special tokens included.")
@click.option("--min-frequency", type=int, default=DEFAULT_MIN_FREQUENCY, show_default=True,
              help="Fewest occurrences a pair needs to be merged. Lower it (1 is the lowest) when "
                   "a small corpus cannot reach --vocab-size.")
@click.option("--text-field", default="text", show_default=True,
              help="Field (.jsonl, .jsonl.zst) or column (.parquet, datasets folder) holding the text.")
@click.option("--split", type=click.Choice(SPLITS), default="file",
              show_default=True,
              help="How .txt inputs are cut into documents: one per file, per line, or per "
                   "blank-line-separated paragraph.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
              help="Input format for all INPUTs; by default inferred from each file's extension "
                   "(.txt, .jsonl, .jsonl.zst, .parquet; a `save_to_disk` folder is 'hf').")
@click.option("--special-token", "special_tokens", multiple=True, metavar="TOKEN",
              help="An extra special token, given after the 8 fixed ones (ids 0-7: <|endoftext|>, "
                   "<|pad|>, ...); repeat for several. They count towards --vocab-size.")
@click.option("--errors", type=click.Choice(ERRORS), default="strict",
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

# ---- pack / verify / inspect (qovaryx_data.packer, qovaryx_data.reader) ----

@main.command("pack")
@click.option("--manifest", "manifest", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Pack manifest (YAML); see manifests/example.yaml for every option.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: the manifest's `output:`].")
@click.option("--workers", type=int, default=None,
              help="Worker processes [default: all cores; with --executor ray, all the cluster's "
                   "CPUs]. The output is identical for any value.")
@click.option("--executor", type=click.Choice(sorted(EXECUTORS)), default="local",
              show_default=True,
              help="Where the work units run: a process pool on this machine, or Ray tasks "
                   "(needs the extra: pip install 'qovaryx[ray]'). The output is identical.")
@click.option("--ray-address", default=None, metavar="auto|HOST:PORT",
              help="With --executor ray: the Ray cluster to use ('auto': the one `ray start "
                   "--head` started here) [default: $RAY_ADDRESS, else a Ray instance started on "
                   "this machine for this pack].")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar (documents, tokens, tokens/s) on stderr.")
@click.option("--force", is_flag=True,
              help="Pack into a non-empty output folder that holds no earlier pack. Only pack's "
                   "own names there are written or replaced (dataset.json, shard-NNNNN.*, "
                   "image_files.json, tokenizer/, train/, val/, .work/, .pack.lock); other files "
                   "are left alone.")
def pack_cmd(manifest, out, workers, executor, ray_address, progress, force) -> None:
    """Compile the sources of a manifest into a packed, memory-mapped dataset (once).

    Re-running with unchanged inputs does nothing; an interrupted run resumes.

    \b
    Example:
      qovaryx-data pack --manifest manifests/shakespeare.yaml --workers 8
      qovaryx-data pack --manifest manifests/shakespeare.yaml --executor ray --ray-address auto
    """
    from qovaryx_data.packer import pack

    if ray_address is not None and executor != "ray":
        raise click.UsageError("--ray-address needs --executor ray")
    r = pack(manifest, out=out, workers=workers, progress=progress, force=force,
             executor=executor, ray_address=ray_address)
    if r.up_to_date:
        click.echo(f"{r.out}: up to date, nothing to do ({r.documents:,} documents, "
                   f"{r.tokens:,} tokens)")
        return
    skipped = sum(r.skipped.values())
    why = ", ".join(f"{k}: {v:,}" for k, v in r.skipped.items())
    click.echo(f"packed {r.out}: {r.documents:,} documents, {r.tokens:,} tokens in "
               f"{r.seconds:.1f} s ({r.tokens / max(r.seconds, 1e-9):,.0f} tokens/s); "
               f"{r.units_done}/{r.units} units tokenized"
               + (f"; skipped {skipped:,} rows ({why})" if skipped else ""))
    for split, folder in r.datasets.items():
        if split:
            click.echo(f"  {split}: {folder}")


@main.command("verify")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def verify_cmd(path) -> None:
    """Re-hash every file of the packed dataset at PATH; exit 1 naming each bad file."""
    from qovaryx_data.reader import verify

    r = verify(path)
    for f, why in r.bad:
        click.echo(f"BAD {f}: {why}", err=True)
    if not r.ok:
        click.echo(f"{path}: {len(r.bad)} of {r.checked} files do not match dataset.json", err=True)
        sys.exit(1)
    click.echo(f"{path}: all {r.checked} files match dataset.json")


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--samples", type=int, default=1, show_default=True,
              help="Decoded sample documents to show.")
@click.option("--images", "images_png", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG contact sheet of a few stored images with their labels.")
def inspect_cmd(path, as_json, samples, images_png) -> None:
    """Summarize the packed dataset at PATH: counts, sources, skips, lengths, a decoded sample."""
    import json

    from qovaryx_data.reader import inspect_dataset

    report = inspect_dataset(path, samples=samples)
    if images_png:
        _write_contact_sheet(path, images_png)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    for split, r in report.items():
        click.echo(f"{split}: {r['path']}  (format {r['format_version']}, {r['dtype']}, "
                   f"{r['shards']} shards)")
        click.echo(f"  documents {r['documents']:,}   tokens {r['tokens']:,}   mean length "
                   f"{r['length_mean']:,.1f}")
        click.echo(f"  tokenizer {r['tokenizer']['hash'][:16]}…  vocab {r['tokenizer']['vocab_size']:,}")
        for s in r["sources"]:
            click.echo(f"  source {s['path']}: {s['documents']:,} documents, {s['tokens']:,} "
                       f"tokens, {s['images']:,} images")
        click.echo(f"  rows with images {r['rows_with_images']:,}; with an image or a label "
                   f"{r['rows_with_image_or_label']:,}")
        if r["decision_counts"]:
            click.echo("  decision labels: " + ", ".join(f"{k} {v:,}"
                                                         for k, v in r["decision_counts"].items()))
        if r["skipped"]:
            click.echo("  skipped: " + ", ".join(f"{k} {v:,}" for k, v in r["skipped"].items()))
            for s in r["skipped_sample"][:5]:
                click.echo(f"    {s['path']} row {s['row']}: {s['reason']}")
        else:
            click.echo("  skipped: none")
        click.echo("  document lengths (tokens):")
        for h in r["length_histogram"]:
            click.echo(f"    {h['min']:>9,}-{h['max']:<9,} {h['documents']:>10,}")
        for s in r["samples"]:
            click.echo(f"  sample #{s['index']} ({s['source']} row {s['row']}, {s['tokens']} "
                       f"tokens): {s['text']!r}")


def _write_contact_sheet(path, out, n: int = 16) -> None:
    from qovaryx_data.images import contact_sheet
    from qovaryx_data.reader import PackedDataset, dataset_folders

    ds = PackedDataset(dataset_folders(path)[0])
    mm = ds.multimodal_doc_indices
    docs = list(itertools.islice((d for d in (ds[int(i)] for i in mm) if d.image is not None), n))
    if not docs:
        raise QovaryxDataError(f"{ds.path}: no row of this dataset has an image ({len(ds):,} rows, "
                               f"{len(mm):,} with a decision label), so "
                               f"--images has nothing to draw; leave the option out")
    names = ds.decision_names
    images, labels = [], []
    for d in docs:
        images.append(d.image)
        labels.append(None if d.decision is None
                      else (names[d.decision] if names and d.decision < len(names) else str(d.decision)))
    contact_sheet(images, labels, out)
    click.echo(f"wrote {out}: {len(images)} images", err=True)


# ---- merge (qovaryx_data.merge) ----

@main.command("merge")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False),
                metavar="DATASET...")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder of the merged dataset (created if missing).")
@click.option("--name", default=None, help="Dataset name [default: the inputs' names joined by +].")
@click.option("--copy", "copy", is_flag=True,
              help="Copy the data files instead of hard-linking them (hard links are used "
                   "wherever the output's file system allows, else copies).")
@click.option("--force", is_flag=True,
              help="Write into a non-empty folder that holds no dataset (only the dataset's own "
                   "names are written there).")
def merge_cmd(inputs, out, name, copy, force) -> None:
    """Concatenate packed datasets (folders holding dataset.json) of one tokenizer, without
    re-tokenizing. Different tokenizers, separators, image shapes or label names are refused.

    \b
    Example:
      qovaryx-data merge build/packed/a build/packed/b --out build/packed/ab
    """
    from qovaryx_data.merge import merge

    r = merge(list(inputs), out, name=name, link=not copy, force=force)
    if r.up_to_date:
        click.echo(f"{r.out}: up to date, nothing to do ({r.documents:,} documents, "
                   f"{r.tokens:,} tokens)")
        return
    click.echo(f"merged {r.inputs} datasets into {r.out}: {r.documents:,} documents, "
               f"{r.tokens:,} tokens, {r.shards} shards in {r.seconds:.2f} s ({r.linked} files "
               f"hard-linked, {r.copied} copied, {r.rewritten} metadata files rewritten)")


# ---- import / export (qovaryx_data.interop) ----

@main.command("import")
@click.option("--from", "fmt", required=True, type=click.Choice(INTEROP_FORMATS),
              help="Format of PATH: megatron (PREFIX of .bin + .idx), nanogpt (a folder with "
                   "train.bin [+ val.bin], or one .bin), llmc (a shard, a glob or a folder).")
@click.argument("path", type=click.Path())
@click.option("--tokenizer", required=True, type=click.Path(exists=True),
              help="The tokenizer the files were written with (its hash goes into dataset.json; "
                   "a file id above its largest id is refused).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder of the packed dataset (train/ and val/ when PATH holds both splits).")
@click.option("--separator", type=click.Choice(INTEROP_SEPARATORS), default="auto",
              show_default=True,
              help="auto: `eos` for nanogpt/llmc, and for megatron when every document ends with "
                   "end-of-text; none: nanogpt/llmc documents lose their separator (megatron: "
                   "tokens kept, recorded as none); eos: megatron refuses a document without one.")
@click.option("--eos-id", type=int, default=None,
              help="End-of-text id of the files [default: the tokenizer's <|endoftext|>].")
@click.option("--shard-tokens", type=int, default=100_000_000, show_default=True,
              help="Roll to a new shard once a shard reaches this many tokens.")
@click.option("--name", default=None, help="Dataset name [default: PATH's name].")
@click.option("--force", is_flag=True,
              help="Write into a non-empty folder that holds no dataset.")
def import_cmd(fmt, path, tokenizer, out, separator, eos_id, shard_tokens, name, force) -> None:
    """Convert Megatron, nanoGPT or llm.c token files at PATH into a packed dataset, without
    re-tokenizing.

    \b
    Example:
      qovaryx-data import --from nanogpt data/openwebtext --tokenizer build/tok --out build/packed/owt
    """
    from qovaryx_data.interop import ImportOptions, import_dataset

    try:
        opts = ImportOptions(separator=separator, eos_id=eos_id, shard_tokens=shard_tokens,
                             name=name)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    r = import_dataset(fmt, path, tokenizer=tokenizer, out=out, options=opts, force=force)
    if r.up_to_date:
        click.echo(f"{r.out}: up to date, nothing to do ({r.documents:,} documents, "
                   f"{r.tokens:,} tokens)")
        return
    click.echo(f"imported {path} ({fmt}) into {r.out}: {r.documents:,} documents, "
               f"{r.tokens:,} tokens, separator {r.separator}, in {r.seconds:.2f} s")
    for split, folder in r.datasets.items():
        if split:
            click.echo(f"  {split}: {folder}")


@main.command("export")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "fmt", required=True, type=click.Choice(INTEROP_FORMATS),
              help="megatron: OUT.bin + OUT.idx; nanogpt: OUT/train.bin (val.bin) + meta.pkl; "
                   "llmc: OUT/NAME_train_000000.bin ...")
@click.option("--out", required=True, type=click.Path(),
              help="megatron: the PREFIX; nanogpt, llmc: a folder.")
@click.option("--drop-images", is_flag=True,
              help="Export the text tokens of rows with an image; their pixels are left out "
                   "(without it such a dataset is refused: these formats hold tokens only).")
@click.option("--drop-labels", is_flag=True,
              help="Export the tokens of rows with a decision label; the labels are left out.")
@click.option("--add-eos", is_flag=True,
              help="nanogpt, for a `separator: none` dataset: append end-of-text after each "
                   "document (nanoGPT has no document index).")
@click.option("--shard-tokens", type=int, default=100_000_000, show_default=True,
              help="llmc: tokens per shard (at most 2**31 - 1).")
@click.option("--name", default=None, help="llmc: shard file prefix [default: the dataset name].")
def export_cmd(path, fmt, out, drop_images, drop_labels, add_eos, shard_tokens, name) -> None:
    """Write the packed dataset at PATH (or both splits of a pack with validation) as Megatron,
    nanoGPT or llm.c token files, without re-tokenizing.

    \b
    Example:
      qovaryx-data export build/packed/x --to megatron --out build/megatron/x_text_document
    """
    from qovaryx_data.interop import ExportOptions, export_dataset

    try:
        opts = ExportOptions(drop_images=drop_images, drop_labels=drop_labels, add_eos=add_eos,
                             shard_tokens=shard_tokens, name=name)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    r = export_dataset(path, to=fmt, out=out, options=opts)
    click.echo(f"exported {path} to {fmt}: {r.documents:,} documents, {r.tokens:,} tokens "
               f"in {r.seconds:.2f} s")
    for f in r.files:
        click.echo(f"  {f}")


if __name__ == "__main__":
    main()
