"""qovaryx_data: byte-level BPE training and pack-once memory-mapped datasets.

Imports are lazy so that the CLI starts without loading torch, datasets or transformers.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "train_bpe": "qovaryx_data.tokenizer",
    "load_tokenizer": "qovaryx_data.tokenizer",
    "tokenizer_hash": "qovaryx_data.tokenizer",
    "pack": "qovaryx_data.packer",  # the module is not called `pack`: importing it would shadow this name
    "pack_dataset": "qovaryx_data.hf",
    "PackedDataset": "qovaryx_data.reader",
    "verify": "qovaryx_data.reader",
    "QovaryxDataError": "qovaryx_data.errors",
    "SourceError": "qovaryx_data.errors",
    "TokenizerError": "qovaryx_data.errors",
    "ManifestError": "qovaryx_data.errors",
    "FormatError": "qovaryx_data.errors",
    "IntegrityError": "qovaryx_data.errors",
    "ImageError": "qovaryx_data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qovaryx_data' has no attribute {name!r}")
