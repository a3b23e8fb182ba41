"""The pack manifest (YAML) as typed dataclasses, and `dataset.json` reading and writing.

A manifest names a tokenizer, an output folder and a list of sources (see manifests/example.yaml
for every option). Relative paths resolve against the manifest's folder. Unknown keys, wrong types
and missing required keys raise ManifestError naming the key and the file.

    >>> m = load_manifest("manifests/shakespeare.yaml")      # doctest: +SKIP
    >>> m.sources[0].format, m.shard_tokens
    ('text', 100000000)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qovaryx_data.errors import FormatError, ManifestError
from qovaryx_data.fileio import atomic_write
from qovaryx_data.format import PACK_FORMAT_MAJOR, PACK_FORMAT_NAME, PACK_FORMAT_VERSION
from qovaryx_data.sources import DEFAULT_UNIT_BYTES, DEFAULT_UNIT_ROWS, ON_ERROR, SourceConfig

DATASET_JSON = "dataset.json"
SEPARATORS = ("eos", "none")

# One `sources:` entry is exactly the readers' config (qovaryx_data.sources.SourceConfig); the
# manifest accepts every field of it except num_decision_classes, which the model fixes at 4.
SourceSpec = SourceConfig


@dataclass(frozen=True)
class PackManifest:
    """A whole pack manifest. Paths are absolute once loaded by `load_manifest`."""
    name: str                                   # dataset name, recorded in dataset.json
    tokenizer: str                              # folder written by train-bpe
    sources: tuple[SourceSpec, ...]             # inputs, packed in this order
    output: str | None = None                   # output folder (--out overrides)
    shard_tokens: int = 100_000_000             # roll to a new shard once a shard reaches this
    validation: float = 0.0                     # share of documents held out to val/ (stable hash)
    on_error: str = "fail"                      # fail: stop at the first bad row; skip: count it
    separator: str = "eos"                      # eos: append <|endoftext|> after every document
    min_tokens: int = 1                         # text-only documents with fewer tokens are skipped
    images: dict[str, Any] | None = None        # images: block -> qovaryx_data.images.ImageSpec
    unit_bytes: int = DEFAULT_UNIT_BYTES        # work unit size for byte-splittable sources
    unit_rows: int = DEFAULT_UNIT_ROWS          # work unit size for row sources (parquet, hf)
    base_dir: str = "."                         # folder relative source paths resolve against

    def __post_init__(self):
        if not self.name:
            raise ValueError("name: must be a non-empty string")
        if not self.sources:
            raise ValueError("sources: list at least one source")
        if self.shard_tokens < 1:
            raise ValueError(f"shard_tokens: must be >= 1, got {self.shard_tokens}")
        if not 0.0 <= self.validation < 1.0:
            raise ValueError(f"validation: a share in [0, 1), got {self.validation}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error: {self.on_error!r} is not 'fail' or 'skip'")
        if self.separator not in SEPARATORS:
            raise ValueError(f"separator: {self.separator!r} is not 'eos' or 'none'")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens: must be >= 0, got {self.min_tokens}")
        if self.unit_bytes < 1024 or self.unit_rows < 1:
            raise ValueError("unit_bytes must be >= 1024 and unit_rows >= 1")
        if self.images is not None:
            try:
                self.image_spec()
            except (ValueError, TypeError) as e:
                raise ValueError(str(e)) from None

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["sources"] = [dataclasses.asdict(s) for s in self.sources]
        return d

    def image_spec(self):
        """The images.ImageSpec of the `images:` block (its defaults when the block is absent)."""
        from qovaryx_data.images import ImageSpec

        return ImageSpec.from_dict(dict(self.images or {}))


# ---- strict YAML -> dataclass conversion ----

_SOURCE_TYPES = {"path": str, "format": (str, type(None)), "split": str, "text_field": str,
                 "image_field": (str, type(None)), "decision_field": (str, type(None)),
                 "decision_labels": (list, type(None)), "decision_position": str, "errors": str,
                 "auto_fields": bool, "allow_empty": bool, "zstd_max_window": int}
_TOP_TYPES = {"name": str, "tokenizer": str, "sources": list, "output": (str, type(None)),
              "shard_tokens": int, "validation": (float, int), "on_error": str, "separator": str,
              "min_tokens": int, "images": (dict, type(None)), "unit_bytes": int, "unit_rows": int}
_REQUIRED_TOP = ("name", "tokenizer", "sources")


def _check(d: Any, types: dict, where: str, file: str, required: tuple[str, ...]) -> None:
    if not isinstance(d, dict):
        raise ManifestError(f"{file}: {where.rstrip('.') or 'the manifest'} must be a mapping, "
                            f"got {type(d).__name__}")
    for k, v in d.items():
        if k not in types:
            raise ManifestError(f"{file}: unknown key {where}{k!r}; allowed keys: "
                                f"{', '.join(types)}")
        want = types[k]
        if (isinstance(v, bool) and want is not bool) or not isinstance(v, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise ManifestError(f"{file}: key {where}{k!r} must be {names}, "
                                f"got {type(v).__name__} {v!r}")
    for k in required:
        if k not in d:
            raise ManifestError(f"{file}: missing required key {where}{k!r}")


def manifest_from_dict(raw: Any, *, base_dir: Path, file: str = "<manifest>") -> PackManifest:
    """Check `raw` (parsed YAML) strictly and build the PackManifest; paths made absolute."""
    _check(raw, _TOP_TYPES, "", file, _REQUIRED_TOP)
    sources = []
    for i, s in enumerate(raw["sources"]):
        where = f"sources[{i}]."
        _check(s, _SOURCE_TYPES, where, file, ("path",))
        s = dict(s)
        if s.get("decision_labels") is not None:
            if not all(isinstance(x, str) for x in s["decision_labels"]):
                raise ManifestError(f"{file}: {where}decision_labels must be a list of strings")
            s["decision_labels"] = tuple(s["decision_labels"])
        try:
            sources.append(SourceSpec(**s))
        except ValueError as e:
            raise ManifestError(f"{file}: {where}{e}") from None
    kw = dict(raw)
    kw["sources"] = tuple(sources)
    kw["tokenizer"] = str((base_dir / raw["tokenizer"]).resolve())
    if kw.get("output") is not None:
        kw["output"] = str((base_dir / kw["output"]).resolve())
    if "validation" in kw:
        kw["validation"] = float(kw["validation"])
    try:
        return PackManifest(**kw, base_dir=str(base_dir.resolve()))
    except ValueError as e:
        raise ManifestError(f"{file}: {e}") from None


def load_manifest(path: str | Path) -> PackManifest:
    """Read and check a YAML pack manifest; relative paths resolve against its folder."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None
    return manifest_from_dict(raw, base_dir=path.resolve().parent, file=str(path))


# ---- dataset.json ----

def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp name in the same folder, fsync, then rename over `path`."""
    atomic_write(path, json.dumps(obj, indent=1) + "\n", fsync=True)


def write_dataset_json(folder: Path, info: dict) -> None:
    """Write `<folder>/dataset.json` atomically; it is the last file a pack writes."""
    write_json_atomic(Path(folder) / DATASET_JSON, info)


def read_dataset_json(folder: str | Path) -> dict:
    """Read and check `<folder>/dataset.json` (format name and major version)."""
    folder = Path(folder)
    p = folder / DATASET_JSON
    if not p.is_file():
        if not folder.exists():
            raise FormatError(f"{folder}: no such packed dataset folder")
        if (folder / "train" / DATASET_JSON).is_file():
            raise FormatError(f"{folder}: no dataset.json here, but {folder / 'train'} has one: "
                              f"this pack has a validation split, open {folder}/train or "
                              f"{folder}/val")
        raise FormatError(f"{p}: missing; expected a dataset.json written last by "
                          f"`qovaryx-data pack`: the dataset is incomplete (re-run pack)")
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({e}); re-run pack") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != PACK_FORMAT_NAME:
        raise FormatError(f"{p}: format {fmt!r}, expected {PACK_FORMAT_NAME!r}")
    version = str(info.get("format_version", ""))
    major = version.split(".")[0]
    if major != str(PACK_FORMAT_MAJOR):
        raise FormatError(f"{p}: format version {version!r}, this reader supports major version "
                          f"{PACK_FORMAT_MAJOR} (writes {PACK_FORMAT_VERSION}); re-pack or use a matching "
                          f"qovaryx release")
    return info
