"""Import and export of other trainers' token files, without re-tokenizing (docs/FORMAT.md
"Import and export").

A format is a module with three hooks and a flag, picked from `FORMATS` by name (as
mosaicml/streaming picks its readers): ``find_inputs(path) -> {split: [files]}``,
``read(files, eos_id) -> Iterator[Batch]`` (whole documents, in file order),
``write(ds, out, split, opts, eos_id, several) -> (files, tokens written)`` (`several`: one of
the splits of a pack with validation is being written), and ``SEPARATED``: whether
its documents are delimited by end-of-text ids (nanogpt, llmc) rather than by an index.

* ``megatron``: Megatron-LM ``.bin`` + ``.idx`` (a document index: boundaries are exact);
* ``nanogpt``: nanoGPT ``train.bin``/``val.bin`` (flat uint16, end-of-text appended after each
  document, as its ``prepare.py`` scripts write) and ``meta.pkl`` (``vocab_size``);
* ``llmc``: llm.c token shards (256 int32 header; end-of-text prepended to each document, as its
  ``fineweb.py`` writes).

    >>> import_dataset("nanogpt", "data/owt", tokenizer="build/tokenizer", out="build/packed/owt")  # doctest: +SKIP
    >>> export_dataset("build/packed/x", to="llmc", out="build/llmc/x")                         # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qovaryx_data.errors import QovaryxDataError

FORMATS = ("megatron", "nanogpt", "llmc")
SEPARATORS = ("auto", "eos", "none")
IMPORT_CODE_VERSION = 1          # part of an import's fingerprint: bump when the output changes
DEFAULT_SHARD_TOKENS = 100_000_000
LLMC_MAX_SHARD_TOKENS = 2**31 - 1   # header[2] is an int32


def format_module(name: str):
    """The module implementing format `name` (a registry keyed by the format name)."""
    if name not in FORMATS:
        raise QovaryxDataError(f"unknown format {name!r}; expected one of {', '.join(FORMATS)}")
    return importlib.import_module(f"qovaryx_data.interop.{name}")


@dataclass(frozen=True)
class ImportOptions:
    separator: str = "auto"     # auto: eos when every document ends with it; none: strip the file's separators
    eos_id: int | None = None   # the file's end-of-text id [default: the tokenizer's <|endoftext|>]
    shard_tokens: int = DEFAULT_SHARD_TOKENS   # the packed dataset's shard size, as pack's
    name: str | None = None     # dataset name [default: the input's file or folder name]

    def __post_init__(self):
        if self.separator not in SEPARATORS:
            raise ValueError(f"separator: {self.separator!r} is not one of {', '.join(SEPARATORS)}")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens: must be >= 1, got {self.shard_tokens}")
        if self.eos_id is not None and self.eos_id < 0:
            raise ValueError(f"eos_id: must be >= 0, got {self.eos_id}")


@dataclass(frozen=True)
class ExportOptions:
    drop_images: bool = False   # write the text tokens of rows with an image (their pixels are lost)
    drop_labels: bool = False   # write the tokens of labelled rows (the labels are lost)
    add_eos: bool = False       # nanogpt, separator none: append end-of-text after each document
    shard_tokens: int = DEFAULT_SHARD_TOKENS   # llmc: tokens per shard (at most 2**31 - 1)
    name: str | None = None     # llmc: shard file prefix [default: the dataset's name]

    def __post_init__(self):
        if not 1 <= self.shard_tokens <= LLMC_MAX_SHARD_TOKENS:
            raise ValueError(f"shard_tokens: must be in 1..{LLMC_MAX_SHARD_TOKENS} (llm.c's header "
                             f"holds the count as int32), got {self.shard_tokens}")


@dataclass
class ImportResult:
    out: Path
    datasets: dict[str, Path]   # split ("" for one dataset) -> folder
    up_to_date: bool
    documents: int = 0
    tokens: int = 0
    separator: str = ""         # the policy recorded (eos or none)
    seconds: float = 0.0


@dataclass
class ExportResult:
    files: list[Path] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0             # tokens written (separators a format adds included)
    seconds: float = 0.0


# ============================================================================ import

def import_dataset(fmt: str, path: str | os.PathLike, *, tokenizer: str | os.PathLike,
                   out: str | os.PathLike, options: ImportOptions = ImportOptions(),
                   force: bool = False) -> ImportResult:
    """Convert the `fmt` files at `path` into a packed dataset at `out` carrying `tokenizer`.

    A folder holding a train and a val split (nanogpt ``train.bin`` + ``val.bin``; llmc
    ``*_train_*.bin`` + ``*_val_*.bin``) becomes ``out/train`` and ``out/val``, as a pack with a
    validation share. Refused: an id above the tokenizer's largest (naming both), a truncated or
    foreign file (naming what its header says). Re-running with the same inputs does nothing.
    """
    from qovaryx_data.format import PACK_FORMAT_VERSION, token_dtype
    from qovaryx_data.outdir import fingerprint_of, invalidate, prepare_output, up_to_date
    from qovaryx_data.tokenizer import EOS_TOKEN, load_tokenizer, max_token_id, tokenizer_hash

    t0 = time.perf_counter()
    mod = format_module(fmt)
    path = Path(path).resolve()
    splits = mod.find_inputs(path)
    tok = load_tokenizer(tokenizer)
    tok_hash, max_id = tokenizer_hash(tok), max_token_id(tok)
    eos_id = options.eos_id if options.eos_id is not None else tok.token_to_id(EOS_TOKEN)
    if eos_id is None and (fmt != "megatron" or options.separator == "eos"):
        raise QovaryxDataError(f"{tokenizer}: the tokenizer has no {EOS_TOKEN} token, and {fmt} "
                               f"files mark documents with an end-of-text id: give it (--eos-id)")
    if eos_id is not None and eos_id > max_id:
        raise QovaryxDataError(f"--eos-id {eos_id}: the tokenizer {tokenizer} holds ids "
                               f"0..{max_id} only; give the files' end-of-text id under that "
                               f"tokenizer (its <|endoftext|> is "
                               f"{tok.token_to_id(EOS_TOKEN)})")
    stats = [(str(f), *_stat(f)) for fs in splits.values() for f in fs]
    fingerprint = fingerprint_of("import", IMPORT_CODE_VERSION, PACK_FORMAT_VERSION, fmt, tok_hash,
                                 eos_id, sorted(asdict(options).items()), *stats)
    out_dir = prepare_output(out, force=force, command="import", inputs=(path,))
    folders = {s: out_dir / s if s else out_dir for s in splits}
    result = ImportResult(out_dir, folders, up_to_date=True)
    if all(up_to_date(f, fingerprint) for f in folders.values()):
        from qovaryx_data.manifest import read_dataset_json

        infos = [read_dataset_json(f) for f in folders.values()]
        result.documents = sum(i["num_documents"] for i in infos)
        result.tokens = sum(i["num_tokens"] for i in infos)
        result.separator = infos[0]["separator"]["policy"]
        result.seconds = time.perf_counter() - t0
        return result
    result.up_to_date = False
    if set(splits) != {""}:
        invalidate(out_dir)
    dtype = token_dtype(max_id + 1)   # the dtype rule: the tokenizer's largest id, as pack's
    common = {"tok": tok, "tok_hash": tok_hash, "max_id": max_id, "eos_id": eos_id,
              "dtype": dtype, "fingerprint": fingerprint, "fmt": fmt, "path": path,
              "tokenizer": Path(tokenizer)}
    policies = set()
    for split, files in splits.items():
        invalidate(folders[split])
        docs, tokens, policy = _import_split(mod, files, folders[split], split or None, options,
                                             common)
        result.documents += docs
        result.tokens += tokens
        policies.add(policy)
    result.separator = "/".join(sorted(policies))
    result.seconds = time.perf_counter() - t0
    return result


def _stat(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_size, st.st_mtime_ns


def _import_split(mod, files: list[Path], folder: Path, split: str | None,
                  opts: ImportOptions, c: dict) -> tuple[int, int, str]:
    from qovaryx_data import __version__
    from qovaryx_data.format import PACK_FORMAT_NAME, PACK_FORMAT_VERSION, dtype_name
    from qovaryx_data.tokenizer import special_token_ids
    from qovaryx_data.writer import DatasetWriter

    import numpy as np

    eos = c["eos_id"]
    separated = mod.SEPARATED
    writer = DatasetWriter(folder, c["dtype"], opts.shard_tokens, None, 1)
    fids = np.arange(len(files), dtype=np.int32)
    n_docs = n_tokens = 0
    all_end_with_eos = True
    try:
        for b in mod.read(files, eos):
            _check_ids(b, files, c)
            tokens, lengths = b.tokens, b.lengths
            ends = np.cumsum(lengths) - 1
            ends_eos = np.zeros(len(lengths), bool)
            if eos is not None and len(tokens):
                ends_eos = (lengths > 0) & (tokens[np.maximum(ends, 0)] == eos)
            if separated and opts.separator == "none":     # the file's separators are not text
                tokens = np.delete(tokens, ends[ends_eos])
                lengths = lengths - ends_eos
                ends_eos = np.zeros(len(lengths), bool)
            if not ends_eos.all():
                if opts.separator == "eos" and not separated:
                    k = int(np.flatnonzero(~ends_eos)[0])
                    raise QovaryxDataError(
                        f"{files[int(b.files[k])]}: document {n_docs + k} does not end with the "
                        f"end-of-text id {eos}, so the data cannot be recorded as `separator: "
                        f"eos`; import with --separator auto or none")
                all_end_with_eos = False
            n = len(lengths)
            part = {"tokens": tokens, "lengths": lengths.astype(np.int64), "file_id": b.files,
                    "row": np.arange(n_docs, n_docs + n, dtype=np.int64),
                    "decision": np.full(n, -1, np.int8), "position": np.full(n, -1, np.int32),
                    "has_image": np.zeros(n, bool), "pixels": np.zeros((0, 1), np.uint8)}
            writer.add(part, slice(None), fids, 0)
            n_docs += n
            n_tokens += int(lengths.sum())
    except BaseException:
        writer.abort()
        raise
    if opts.separator != "auto":
        policy = opts.separator
    elif separated:          # the format's documents end with end-of-text (a last one may not)
        policy = "eos"
    else:                    # an index bounds documents: eos when every one ends with it
        policy = "eos" if all_end_with_eos and n_docs and eos is not None else "none"
    tok = c["tok"]
    info = {
        "format": PACK_FORMAT_NAME, "format_version": PACK_FORMAT_VERSION,
        "created_by": f"qovaryx {__version__} (import code {IMPORT_CODE_VERSION})",
        "name": opts.name or c["path"].name,
        "tokenizer": {"path": "tokenizer", "hash": c["tok_hash"],
                      "vocab_size": tok.get_vocab_size(with_added_tokens=True),
                      "max_id": c["max_id"], "special_tokens": special_token_ids(tok)},
        "dtype": dtype_name(c["dtype"]),
        "separator": {"policy": policy, "eos_id": eos if policy == "eos" else None},
        "images": None, "decision": None, "skipped": {}, "skipped_sample": [],
        "fingerprint": c["fingerprint"], "manifest": None,
        "imported": {"format": c["fmt"], "path": str(c["path"]), "options": asdict(opts),
                     "eos_id": eos},
    }
    writer.finish(info, split=split, tokenizer_src=c["tokenizer"], sources=[str(c["path"])],
                  image_files=[], source_files=[str(f) for f in files])
    return n_docs, n_tokens, policy


def _check_ids(b, files: list[Path], c: dict) -> None:
    import numpy as np

    if not len(b.tokens):
        return
    hi, lo = int(b.tokens.max()), int(b.tokens.min())
    if hi > c["max_id"] or lo < 0:
        bad = hi if hi > c["max_id"] else lo
        k = int(np.searchsorted(np.cumsum(b.lengths), int(np.flatnonzero(b.tokens == bad)[0]),
                                side="right"))
        raise QovaryxDataError(
            f"{files[int(b.files[min(k, len(b.files) - 1)])]}: token id {bad}, but the tokenizer "
            f"{c['tokenizer']} holds ids 0..{c['max_id']} only: these files were written with "
            f"another (larger) tokenizer; give that one (--tokenizer)")


# ============================================================================ export

def export_dataset(path: str | os.PathLike, *, to: str, out: str | os.PathLike,
                   options: ExportOptions = ExportOptions()) -> ExportResult:
    """Write the packed dataset at `path` (or both splits of a pack with validation) as `to`
    files at `out`. What the format cannot hold (images, labels; nanogpt: document boundaries
    without separators) is refused unless the options drop it explicitly."""
    from qovaryx_data.reader import PackedDataset, dataset_folders

    t0 = time.perf_counter()
    mod = format_module(to)
    folders = dataset_folders(path)
    res = ExportResult()
    for folder in folders:
        ds = PackedDataset(folder)
        _refuse_lost(ds, to, options)
        split = ds.info.get("split") or (None if len(folders) == 1 else folder.name)
        files, tokens = mod.write(ds, Path(out), split, options, _eos_id(ds), len(folders) > 1)
        res.files.extend(f for f in files if f not in res.files)   # nanogpt: one meta.pkl
        res.documents += len(ds)
        res.tokens += tokens
    res.seconds = time.perf_counter() - t0
    return res


def _eos_id(ds) -> int | None:
    sep = ds.info["separator"]
    if sep.get("eos_id") is not None:
        return int(sep["eos_id"])
    from qovaryx_data.tokenizer import EOS_TOKEN

    return ds.load_tokenizer().token_to_id(EOS_TOKEN)


def _refuse_lost(ds, to: str, o: ExportOptions) -> None:
    info = ds.info
    n_img = int(info.get("num_images") or 0)
    n_lab = sum(sum(s.get("decisions") or []) for s in info["sources"])
    if n_img and not o.drop_images:
        raise QovaryxDataError(f"{ds.path}: {n_img:,} rows have an image, and {to} files hold "
                               f"tokens only; pass --drop-images to export those rows' text "
                               f"tokens without their pixels")
    if n_lab and not o.drop_labels:
        raise QovaryxDataError(f"{ds.path}: {n_lab:,} rows have a decision label, and {to} files "
                               f"hold tokens only; pass --drop-labels to export those rows' "
                               f"tokens without their labels")
