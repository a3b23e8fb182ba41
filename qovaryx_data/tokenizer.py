"""Byte-level BPE tokenizer: train (`train_bpe`), load (`load_tokenizer`) and identify (`tokenizer_hash`).

The tokenizer is a plain HF `tokenizers` byte-level BPE: no normalizer, a ByteLevel pre-tokenizer
(GPT-2 split regex, no prefix space) over the 256 byte symbols, and a ByteLevel decoder, so every
string decodes back to exactly itself. The special tokens of docs/CONTRACTS.md take ids 0..7; the
output folder loads with `transformers.AutoTokenizer.from_pretrained(dir)` without qovaryx.

    >>> from qovaryx_data import train_bpe, load_tokenizer
    >>> train_bpe(["plays/"], out="tok", vocab_size=2048)          # doctest: +SKIP
    >>> tok = load_tokenizer("tok")                                 # doctest: +SKIP
    >>> tok.decode(tok.encode("Thou art\\r\\n\\t🙂").ids, skip_special_tokens=False)   # doctest: +SKIP
    'Thou art\\r\\n\\t🙂'

See docs/TOKENIZER.md for the defaults, the hash definition and the output folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qovaryx_data.errors import TokenizerError
from qovaryx_data.fileio import atomic_write
from qovaryx_data.sources import FORMATS, SPLITS   # light: the readers import their libraries lazily

# The fixed special tokens, ids 0..7 in this order (docs/CONTRACTS.md). Extra ones are appended after.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",   # 0: document separator; eos and bos
    "<|pad|>",         # 1: padding
    "<|image_start|>",  # 2: reserved, start of the image prefix
    "<|image_end|>",   # 3: reserved, end of the image prefix
    "<|decision|>",    # 4: reserved, where the decision head pools
    "<|reserved_0|>",  # 5..7: reserved for future heads
    "<|reserved_1|>",
    "<|reserved_2|>",
)
EOS_TOKEN = BOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

DEFAULT_VOCAB_SIZE = 20_242     # entries in total, special tokens included
DEFAULT_MIN_FREQUENCY = 2       # a pair must occur twice to be merged (see docs/TOKENIZER.md)
BYTE_ALPHABET_SIZE = 256        # ByteLevel maps each byte to one visible symbol

TOKENIZER_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"
META_FILE = "qovaryx_tokenizer.json"
# Tokenizer files of other layouts that transformers would read besides (or instead of) ours;
# train_bpe removes them from --out so the folder holds one tokenizer only.
STALE_HF_FILES = ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                  "tokenizer.model")
# Every file that belongs to a tokenizer in a transformers-style folder (ours and other layouts):
# a pack copies these (and nothing else, e.g. no weights) from a `tokenizer:` folder, and train-bpe
# refuses an --out holding any of them from another tokenizer unless forced.
TOKENIZER_FILES = (TOKENIZER_FILE, HF_CONFIG_FILE, META_FILE, *STALE_HF_FILES,
                   "chat_template.jinja", "chat_template.json")
META_FORMAT = "qovaryx-tokenizer"
META_VERSION = 1                # major version of qovaryx_tokenizer.json; readers refuse another
HASH_VERSION = 1                # version of the hash definition below; part of the hashed bytes

ERRORS = ("strict", "replace")
# The parts of tokenizer.json that define the encoding (token ids) and decoding. Not hashed:
# "version" (file format), "truncation" and "padding" (call-time batch options).
_HASHED_PARTS = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder")


class TokenizerConfigError(TokenizerError, ValueError):
    """An invalid `BpeConfig` field: a ValueError for the library, a TokenizerError for the CLI."""


@dataclass(frozen=True)
class BpeConfig:
    """What `train_bpe` trains. Stored in qovaryx_tokenizer.json next to the tokenizer."""

    vocab_size: int = DEFAULT_VOCAB_SIZE    # total entries, the special tokens included
    min_frequency: int = DEFAULT_MIN_FREQUENCY  # fewest occurrences for a pair to be merged
    special_tokens: tuple[str, ...] = ()    # extra special tokens, ids after the fixed 8
    text_field: str = "text"                # jsonl / parquet / hf column holding the text
    split: str = "file"                     # .txt documents: one per file, line or paragraph
    format: str | None = None               # input format; None infers it from the extension
    errors: str = "strict"                  # invalid UTF-8: strict (error) or replace (U+FFFD)
    allow_smaller_vocab: bool = False       # keep a vocabulary short of vocab_size instead of failing

    def __post_init__(self) -> None:
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        n_special = len(self.all_special_tokens)
        least = BYTE_ALPHABET_SIZE + n_special
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise TokenizerConfigError(f"vocab_size={self.vocab_size!r} must be an integer "
                                       f"(default {DEFAULT_VOCAB_SIZE})")
        if self.vocab_size < least:
            raise TokenizerConfigError(
                f"vocab_size={self.vocab_size!r} is too small: a byte-level vocabulary needs the "
                f"{BYTE_ALPHABET_SIZE} byte symbols plus {n_special} special tokens, so at least "
                f"{least}; give --vocab-size {least} or more (default {DEFAULT_VOCAB_SIZE})")
        if isinstance(self.min_frequency, bool) or not isinstance(self.min_frequency, int) \
                or self.min_frequency < 1:
            raise TokenizerConfigError(
                f"min_frequency={self.min_frequency!r} must be an integer >= 1 "
                f"(1 merges pairs seen once; default {DEFAULT_MIN_FREQUENCY})")
        for t in self.special_tokens:
            if not isinstance(t, str) or not t or t.strip() != t:
                raise TokenizerConfigError(
                    f"special token {t!r} must be a non-empty string without surrounding whitespace")
        dupes = sorted({t for t in self.all_special_tokens if self.all_special_tokens.count(t) > 1})
        if dupes:
            raise TokenizerConfigError(
                f"special token(s) {dupes} given twice; the fixed ones {list(SPECIAL_TOKENS)} are "
                f"always present, pass only additional ones with --special-token")
        if self.split not in SPLITS:
            raise TokenizerConfigError(f"split={self.split!r}: choose one of {list(SPLITS)}")
        if self.format is not None and self.format not in FORMATS:
            raise TokenizerConfigError(f"format={self.format!r}: choose one of {list(FORMATS)}, "
                                       f"or None to infer it from each file's extension")
        if self.errors not in ERRORS:
            raise TokenizerConfigError(f"errors={self.errors!r}: choose one of {list(ERRORS)}")
        if not self.text_field:
            raise TokenizerConfigError("text_field must name the field holding the text, e.g. 'text'")

    @property
    def all_special_tokens(self) -> tuple[str, ...]:
        """The fixed special tokens then the extra ones, in id order (0, 1, ...)."""
        return SPECIAL_TOKENS + tuple(self.special_tokens)


@dataclass(frozen=True)
class TrainResult:
    """What `train_bpe` wrote."""

    out: Path                  # the output folder
    vocab_size: int            # entries in the vocabulary, special tokens included
    hash: str                  # tokenizer_hash of the result
    documents: int             # non-empty documents read
    characters: int            # characters in them
    special_token_ids: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- training

def train_bpe(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
              vocab_size: int = DEFAULT_VOCAB_SIZE,
              min_frequency: int = DEFAULT_MIN_FREQUENCY,
              special_tokens: Sequence[str] = (),
              text_field: str = "text",
              split: str = "file",
              format: str | None = None,
              errors: str = "strict",
              allow_smaller_vocab: bool = False,
              force: bool = False,
              progress: bool | None = None) -> TrainResult:
    """Train a byte-level BPE tokenizer on `inputs` and write it to the folder `out`.

    `inputs` are files, folders or globs in any format `qovaryx_data.sources` reads (.txt, .jsonl,
    .jsonl.zst, .parquet, a `datasets` folder); they are streamed. `out` receives tokenizer.json,
    tokenizer_config.json and qovaryx_tokenizer.json. An `out` that already holds a different
    tokenizer is refused unless `force`; the same tokenizer again is rewritten identically.
    `progress` shows the trainer's progress bars (default: when stderr is a terminal).
    Raises TokenizerError / SourceError (both QovaryxDataError) for bad inputs or options.
    """
    cfg = BpeConfig(vocab_size=vocab_size, min_frequency=min_frequency,
                    special_tokens=tuple(special_tokens), text_field=text_field, split=split,
                    format=format, errors=errors, allow_smaller_vocab=allow_smaller_vocab)
    inputs = [os.fspath(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    if not inputs:
        raise TokenizerError("no input given: name at least one file, folder or glob")
    out = Path(out)
    old_hash = _check_out_dir(out, cfg, force)
    if progress is None:
        progress = sys.stderr.isatty()

    from qovaryx_data.sources import infer_format, iter_texts, resolve_inputs

    # Fail fast on a missing input (before any training), and count the documents when that is
    # free (one per text file) so the progress bar can show a total.
    files = [p for inp in inputs for p in resolve_inputs(inp, format=cfg.format)]
    one_doc_per_file = cfg.split == "file" and all(
        (cfg.format or infer_format(p)) == "text" for p in files)
    length = len(files) if one_doc_per_file else None

    tokenizer = _new_tokenizer()
    trainer = _new_trainer(cfg, progress)
    stats = {"documents": 0, "characters": 0}

    def documents() -> Iterator[str]:
        for text in iter_texts(inputs, format=cfg.format, split=cfg.split,
                               text_field=cfg.text_field, errors=cfg.errors):
            stats["documents"] += 1
            stats["characters"] += len(text)
            yield text

    tokenizer.train_from_iterator(documents(), trainer, length=length)

    if stats["documents"] == 0:
        raise TokenizerError(
            f"empty corpus: no non-empty document in {_show(inputs)}; "
            f"check the paths, --format, --split and --text-field")
    reached = tokenizer.get_vocab_size(with_added_tokens=True)
    if reached < cfg.vocab_size and not cfg.allow_smaller_vocab:
        raise TokenizerError(
            f"the corpus is too small for --vocab-size {cfg.vocab_size}: training stopped at "
            f"{reached} entries ({stats['documents']} documents, {stats['characters']:,} characters "
            f"in {_show(inputs)}) because no remaining pair occurs {cfg.min_frequency} times or "
            f"more. Fixes: train on more text; ask for a smaller --vocab-size (e.g. {reached}); "
            f"lower --min-frequency (now {cfg.min_frequency}, 1 is the lowest); or pass "
            f"--allow-smaller-vocab to keep the {reached}-entry vocabulary")
    ids = {t: tokenizer.token_to_id(t) for t in cfg.all_special_tokens}
    assert list(ids.values()) == list(range(len(ids))), f"special tokens not first: {ids}"

    new_hash = tokenizer_hash(tokenizer)
    if old_hash is not None and old_hash != new_hash and not force:
        raise TokenizerError(
            f"{out} already holds a different tokenizer (hash {old_hash[:16]}, the new one is "
            f"{new_hash[:16]}): choose another --out, or pass --force to replace it")

    out.mkdir(parents=True, exist_ok=True)
    # No metadata while the other files change: an interrupted run leaves an incomplete folder.
    (out / META_FILE).unlink(missing_ok=True)
    for name in STALE_HF_FILES:   # left by other tools; transformers would read them over ours
        (out / name).unlink(missing_ok=True)
    atomic_write(out / TOKENIZER_FILE, lambda tmp: tokenizer.save(str(tmp), pretty=True))
    atomic_write(out / HF_CONFIG_FILE, _dumps(_hf_config(cfg)))
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "hash": new_hash,
        "hash_version": HASH_VERSION,
        "vocab_size": reached,
        "special_tokens": ids,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "config": asdict(cfg),
        "inputs": inputs,
        "documents": stats["documents"],
        "characters": stats["characters"],
        "qovaryx_version": _qovaryx_version(),
        "tokenizers_version": _tokenizers_version(),
    }
    atomic_write(out / META_FILE, _dumps(meta))   # written last: its presence marks a complete folder
    return TrainResult(out=out, vocab_size=reached, hash=new_hash, documents=stats["documents"],
                       characters=stats["characters"], special_token_ids=ids)


def _new_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())   # no unk token: every byte has a symbol
    tok.normalizer = None            # any normalizer would break exact round trips
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # The post-processor transformers installs when it loads a tokenizer without one (adds
    # nothing): writing it ourselves makes load + save_pretrained a fixed point of tokenizer.json.
    tok.post_processor = _identity_post_processor()
    return tok


def _identity_post_processor():
    from tokenizers import processors

    return processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def _new_trainer(cfg: BpeConfig, progress: bool):
    from tokenizers import AddedToken, pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        show_progress=bool(progress),
        special_tokens=[AddedToken(t, special=True, normalized=False)
                        for t in cfg.all_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )


def _hf_config(cfg: BpeConfig) -> dict[str, Any]:
    """tokenizer_config.json for `AutoTokenizer.from_pretrained`: no BOS/EOS added on encode,
    no clean-up of spaces on decode (both would break exact round trips)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "extra_special_tokens": [t for t in cfg.all_special_tokens
                                 if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)],
    }


def _check_out_dir(out: Path, cfg: BpeConfig, force: bool) -> str | None:
    """Refuse an `out` we must not write to; return the hash of the tokenizer it holds, if any.

    Refuses at once (before training) when the existing tokenizer certainly differs from the one
    asked for (other special tokens or size); otherwise the hashes are compared after training.
    """
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} is a file; give a folder (it is created if missing)")
    if force:
        return None
    if not (out / TOKENIZER_FILE).exists():
        other = [n for n in TOKENIZER_FILES if (out / n).exists()]
        if other:   # e.g. a GPT-2 style vocab.json + merges.txt: train-bpe would delete them
            raise TokenizerError(
                f"--out {out} holds another tokenizer's files ({', '.join(other)}); train-bpe "
                f"would replace them: choose another --out, or pass --force to replace them")
        return None
    stale = [n for n in STALE_HF_FILES if (out / n).exists()]
    if stale:   # another layout's files beside a tokenizer.json: train-bpe would delete them
        raise TokenizerError(
            f"--out {out} holds, beside {TOKENIZER_FILE}, other tokenizer files ({', '.join(stale)}) "
            f"that train-bpe would delete: choose another --out, or pass --force to replace them")
    try:
        old = load_tokenizer(out)
        old_hash = tokenizer_hash(old)
    except TokenizerError as e:
        raise TokenizerError(f"--out {out} holds a tokenizer that cannot be read ({e}); "
                             f"pass --force to replace it or choose another --out") from None
    old_special = list(special_token_ids(old))
    old_size = old.get_vocab_size(with_added_tokens=True)
    if old_special != list(cfg.all_special_tokens) or \
            (old_size != cfg.vocab_size and not cfg.allow_smaller_vocab):
        raise TokenizerError(
            f"{out} already holds a different tokenizer ({old_size} entries, special tokens "
            f"{old_special}); choose another --out, or pass --force to replace it")
    return old_hash


# ---------------------------------------------------------------- loading and hashing

def load_tokenizer(path: str | os.PathLike):
    """Load a `tokenizers.Tokenizer` from a folder written by `train_bpe` (or its tokenizer.json).

    When the folder has qovaryx_tokenizer.json, its format version is checked and its recorded
    hash must match tokenizer.json (a hand-edited or mixed-up folder is refused).
    """
    file, tok = _read_tokenizer_file(path)
    meta_file = file.parent / META_FILE
    if meta_file.is_file():
        meta = read_meta(meta_file.parent)
        got = tokenizer_hash(tok)
        if meta.get("hash") != got:
            why = "the folder was edited or mixed up; retrain it"
            if meta.get("tokenizers_version") not in (None, _tokenizers_version()):
                why = (f"it was written with tokenizers {meta['tokenizers_version']}, this is "
                       f"{_tokenizers_version()}, which may serialize it differently; use that "
                       f"version or retrain")
            raise TokenizerError(f"{file} does not match {meta_file}: hash {got[:16]} != recorded "
                                 f"{str(meta.get('hash'))[:16]}; {why}")
    return tok


def _read_tokenizer_file(path: str | os.PathLike):
    """(tokenizer.json path, tokenizers.Tokenizer) of a folder or a tokenizer.json file; nothing
    else is checked (load_tokenizer checks the folder's qovaryx_tokenizer.json)."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{file}: no such tokenizer file; train one with `qovaryx-data "
                             f"train-bpe INPUT... --out {path}`")
    try:
        return file, Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust loader raises plain Exception on any parse problem
        raise TokenizerError(f"{file}: not a valid tokenizers JSON file ({e})") from None


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Read and check qovaryx_tokenizer.json of a tokenizer folder."""
    file = Path(folder) / META_FILE
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{file}: missing; this folder was not written by train-bpe") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise TokenizerError(f"{file}: format {meta.get('format') if isinstance(meta, dict) else None!r}"
                             f", expected {META_FORMAT!r}")
    if meta.get("version") != META_VERSION:
        raise TokenizerError(f"{file}: version {meta.get('version')!r}, this qovaryx reads "
                             f"version {META_VERSION}; use a matching qovaryx or retrain")
    return meta


def tokenizer_hash(tokenizer_or_dir: Any) -> str:
    """SHA-256 (hex) of what defines the encoding, independent of how the file was written.

    Accepts a `tokenizers.Tokenizer`, a transformers fast tokenizer (its `backend_tokenizer`),
    a tokenizer folder or a tokenizer.json path. Hashed, after loading with `tokenizers` (so
    file formatting, key order and the merges notation do not matter): the `model` (type, options,
    vocab in id order, merges in rank order), the added tokens (sorted by id, with their flags),
    the `normalizer`, `pre_tokenizer`, `post_processor` (none counts as the identity template
    train_bpe writes) and `decoder`, each in the compact JSON `tokenizers` serializes it to,
    after a line naming the hash definition's version. Padding and truncation are not hashed.
    So `AutoTokenizer.from_pretrained(d).save_pretrained(e)` keeps the hash.

        >>> tokenizer_hash("build/tokenizer")          # doctest: +SKIP
        'ac82e35bec845a37596f4c10afb0d77f913cd51347418559108fc93097bc22ff'
    """
    tok = _as_tokenizer(tokenizer_or_dir)
    added = tok.get_added_tokens_decoder()
    added_json = json.dumps([{"id": i, **added[i].__getstate__()} for i in sorted(added)],
                            sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    post_processor = tok.post_processor or _identity_post_processor()
    parts = {
        "model": tok.model.__getstate__(),
        "added_tokens": added_json.encode("utf-8"),
        "normalizer": _state(tok.normalizer),
        "pre_tokenizer": _state(tok.pre_tokenizer),
        "post_processor": _state(post_processor),
        "decoder": _state(tok.decoder),
    }
    h = hashlib.sha256(f"qovaryx-tokenizer-hash {HASH_VERSION}\n".encode())
    for name in _HASHED_PARTS:   # fixed order
        h.update(name.encode() + b"=")
        h.update(parts[name])
        h.update(b"\n")
    return h.hexdigest()


def _state(component: Any) -> bytes:
    """Compact JSON of a tokenizers component (normalizer, pre-tokenizer, ...), b"null" if none."""
    return b"null" if component is None else component.__getstate__()


def _as_tokenizer(obj: Any):
    from tokenizers import Tokenizer

    if isinstance(obj, Tokenizer):
        return obj
    backend = getattr(obj, "backend_tokenizer", None)   # transformers fast tokenizers
    if isinstance(backend, Tokenizer):
        return backend
    if isinstance(obj, (str, os.PathLike)):
        return _read_tokenizer_file(obj)[1]
    raise TypeError(f"tokenizer_hash: expected a tokenizers.Tokenizer, a transformers fast "
                    f"tokenizer or a path, got {type(obj).__name__}")


def max_token_id(tok) -> int:
    """The largest id `tok` (a tokenizers.Tokenizer) can produce: its vocabulary's and added
    tokens' highest id. Ids need not be dense (a WordLevel vocabulary may hold 4 entries with
    id 70,000 among them), so this, not the vocabulary count, decides the token dtype.

        >>> max_token_id(load_tokenizer("tok"))      # doctest: +SKIP
        20241
    """
    ids = tok.get_vocab(with_added_tokens=True).values()
    return max(ids, default=0)


def special_token_ids(tok) -> dict[str, int]:
    """The special added tokens of a `tokenizers.Tokenizer`, token -> id, in id order.

        >>> special_token_ids(load_tokenizer("tok"))      # doctest: +SKIP
        {'<|endoftext|>': 0, '<|pad|>': 1, ...}
    """
    added = tok.get_added_tokens_decoder()
    return {added[i].content: int(i) for i in sorted(added) if added[i].special}


# ---------------------------------------------------------------- small helpers

def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _show(inputs: Sequence[str]) -> str:
    shown = ", ".join(inputs[:3])
    return shown + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")


def _tokenizers_version() -> str:
    import tokenizers

    return tokenizers.__version__


def _qovaryx_version() -> str:
    from qovaryx_data import __version__

    return __version__
