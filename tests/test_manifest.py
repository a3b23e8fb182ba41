"""Pack manifests: strict keys and types, path resolution, the documented example; dataset.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qovaryx_data.errors import FormatError, ManifestError
from qovaryx_data.format import PACK_FORMAT_MAJOR, PACK_FORMAT_NAME
from qovaryx_data.manifest import (PackManifest, SourceSpec, load_manifest, read_dataset_json,
                                   write_dataset_json)

REPO = Path(__file__).resolve().parents[1]
BASE = {"name": "t", "tokenizer": "tok", "output": "out",
        "sources": [{"path": "corpus/*.txt", "format": "text", "split": "line"}]}


def _write(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(d), encoding="utf-8")
    return p


def test_load_resolves_paths_against_the_manifest_folder(tmp_path):
    m = load_manifest(_write(tmp_path, {**BASE, "shard_tokens": 1000, "validation": 0.1}))
    assert m.tokenizer == str((tmp_path / "tok").resolve())
    assert m.output == str((tmp_path / "out").resolve())
    assert m.base_dir == str(tmp_path.resolve())
    assert m.sources == (SourceSpec(path="corpus/*.txt", format="text", split="line"),)
    assert (m.shard_tokens, m.validation, m.on_error, m.separator) == (1000, 0.1, "fail", "eos")


def test_underscored_ints_as_in_the_issue(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("name: x\ntokenizer: t\nshard_tokens: 100_000_000\nsources:\n  - path: a.txt\n")
    assert load_manifest(p).shard_tokens == 100_000_000


@pytest.mark.parametrize("edit, match", [
    ({"shard_token": 5}, r"unknown key 'shard_token'"),
    ({"sources": [{"path": "a", "txt_field": "x"}]}, r"unknown key sources\[0\]\.'txt_field'"),
    ({"shard_tokens": "big"}, r"key 'shard_tokens' must be int, got str"),
    ({"shard_tokens": True}, r"key 'shard_tokens' must be int, got bool"),
    ({"validation": "0.1"}, r"key 'validation' must be float or int"),
    ({"sources": [{"format": "text"}]}, r"missing required key sources\[0\]\.'path'"),
    ({"sources": []}, r"sources: list at least one source"),
    ({"sources": [{"path": "a", "format": "csv"}]}, r"sources\[0\]\.format: 'csv' is not one of"),
    ({"sources": [{"path": "a.txt", "split": "word"}]}, r"split: 'word'"),
    ({"on_error": "ignore"}, r"on_error: 'ignore'"),
    ({"validation": 1.5}, r"validation: a share in \[0, 1\)"),
    ({"shard_tokens": 0}, r"shard_tokens: must be >= 1"),
    ({"separator": "newline"}, r"separator: 'newline'"),
    ({"images": {"size": [28, 28], "colour": "L"}}, r"images: unknown key\(s\) \['colour'\]"),
    ({"images": {"size": [28], "mode": "L"}}, r"images.size must be \[H, W\]"),
    ({"sources": [{"path": "a", "decision_labels": ["a", "b"]}]}, r"set decision_field too"),
    ({"sources": [{"path": "a", "decision_field": "y", "decision_labels": ["a", "a"]}]},
     r"names must be unique"),
    ({"sources": [{"path": "a", "decision_field": "y", "decision_labels": list("abcde")}]},
     r"give 1 to 4 names"),
])
def test_bad_manifests_name_the_key_and_the_file(tmp_path, edit, match):
    p = _write(tmp_path, {**BASE, **edit})
    with pytest.raises(ManifestError, match=match) as e:
        load_manifest(p)
    assert str(p) in str(e.value)


def test_missing_required_keys_and_non_mapping(tmp_path):
    for key in ("name", "tokenizer", "sources"):
        d = {k: v for k, v in BASE.items() if k != key}
        with pytest.raises(ManifestError, match=f"missing required key '{key}'"):
            load_manifest(_write(tmp_path, d))
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match="must be a mapping, got list"):
        load_manifest(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_every_manifest_in_the_repo_loads_and_example_sets_every_option():
    paths = sorted((REPO / "manifests").glob("*.yaml"))
    assert REPO / "manifests" / "example.yaml" in paths
    for p in paths:
        load_manifest(p)
    raw = yaml.safe_load((REPO / "manifests" / "example.yaml").read_text())
    top = {f for f in PackManifest.__dataclass_fields__ if f != "base_dir"}
    assert top <= set(raw), f"example.yaml lacks {top - set(raw)}"
    src_keys = set().union(*(set(s) for s in raw["sources"]))
    assert set(SourceSpec.__dataclass_fields__) - {"num_decision_classes"} <= src_keys


def test_dataset_json_round_trip_and_refusals(tmp_path):
    info = {"format": PACK_FORMAT_NAME, "format_version": f"{PACK_FORMAT_MAJOR}.7", "x": [1, 2]}
    write_dataset_json(tmp_path, info)
    assert read_dataset_json(tmp_path) == info          # a newer minor version is readable
    assert not list(tmp_path.glob(".*tmp*"))            # atomic write leaves no temp file
    (tmp_path / "dataset.json").write_text(json.dumps({**info, "format_version": "2.0"}))
    with pytest.raises(FormatError, match=r"format version '2.0', this reader supports major "
                                          r"version 1"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({**info, "format": "mds"}))
    with pytest.raises(FormatError, match="format 'mds', expected 'qovaryx-packed'"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_dataset_json(tmp_path)
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(FormatError, match="dataset.json: missing.*incomplete"):
        read_dataset_json(tmp_path)


def test_defaults_mirror_the_readers():
    from qovaryx_data import sources

    from qovaryx_data import manifest

    assert set(manifest._SOURCE_TYPES) | {"num_decision_classes"} == \
        set(sources.SourceConfig.__dataclass_fields__)
