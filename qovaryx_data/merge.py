"""`merge`: concatenate packed datasets of one tokenizer into one, without re-tokenizing.

The inputs' shards become the output's shards, in input order, renumbered. Token, offset and
image files are hard-linked (copied where the output is on another file system, or with
``link=False``): their bytes do not depend on where a shard sits in a dataset. A shard's
``.meta.arrow`` indexes its input's own `sources` and source files, so it is rewritten wherever
those indices move (the first input's are linked as they are). ``dataset.json`` is rebuilt:
the sources of every input in order, counts summed, the checksums of the linked files taken
from the inputs (so nothing is re-hashed; `verify` re-hashes), and a fingerprint derived from
the inputs' fingerprints, so a re-run with the same inputs is "up to date".

    >>> merge(["build/packed/a", "build/packed/b"], "build/packed/ab")     # doctest: +SKIP
    MergeResult(out=PosixPath('build/packed/ab'), up_to_date=False, inputs=2, documents=84, ...)
"""
from __future__ import annotations

import errno
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qovaryx_data.errors import FormatError, QovaryxDataError
from qovaryx_data.format import (IMAGE_FILES, IMAGE_FILES_FORMAT, IMAGE_FILES_VERSION,
                                 META_FORMAT_KEY, META_FORMAT_VALUE, META_VERSION_KEY,
                                 PACK_FORMAT_MAJOR, PACK_FORMAT_NAME, PACK_FORMAT_VERSION,
                                 SOURCE_FILES, SOURCE_FILES_FORMAT, SOURCE_FILES_VERSION,
                                 file_entry, meta_schema)
from qovaryx_data.manifest import DATASET_JSON, write_dataset_json, write_json_atomic
from qovaryx_data.outdir import fingerprint_of, invalidate, prepare_output, up_to_date

MERGE_CODE_VERSION = 1          # part of the fingerprint: bump when the output changes
SKIP_SAMPLE_LIMIT = 100         # as pack: skipped_sample keeps at most this many
_MAX_SOURCES = np.iinfo(np.int16).max + 1   # the metadata column `source` is int16
# errors of os.link that mean "cannot link here" (another file system, no hard links): copy then
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass
class MergeResult:
    out: Path                   # the merged dataset folder
    up_to_date: bool            # True: a complete merge of the same inputs was there already
    inputs: int
    documents: int = 0
    tokens: int = 0
    shards: int = 0
    linked: int = 0             # data files hard-linked
    copied: int = 0             # data files copied (other file system, or link=False)
    rewritten: int = 0          # metadata files rewritten (their source/file indices moved)
    seconds: float = 0.0


def merge(inputs: list[str | os.PathLike], out: str | os.PathLike, *, name: str | None = None,
          link: bool = True, force: bool = False) -> MergeResult:
    """Concatenate the packed datasets `inputs` (folders holding dataset.json) into `out`.

    Refused (QovaryxDataError naming both inputs and both values): different tokenizer hashes,
    token dtypes, separators, image shapes or decision class names. A text-only input merges with
    one that has images or labels. `name` defaults to the inputs' names joined by "+". With
    `link=False` every file is copied (an output independent of the inputs' inodes). `force`: write
    into a non-empty folder that holds no dataset (only the dataset's own names are replaced).
    """
    t0 = time.perf_counter()
    from qovaryx_data.reader import PackedDataset

    if not inputs:
        raise QovaryxDataError("merge: give at least one input dataset")
    paths = [Path(p).resolve() for p in inputs]
    for j, p in enumerate(paths):
        if p in paths[:j]:
            raise QovaryxDataError(
                f"merge: {p} is given twice (inputs {paths.index(p) + 1} and {j + 1}); each input "
                f"is concatenated, so every one of its documents would be there twice: give "
                f"each dataset once")
    datasets = [PackedDataset(_dataset_folder(p)) for p in paths]   # checks sizes and headers
    infos = [d.info for d in datasets]
    _check_compatible(paths, infos)
    names = list(dict.fromkeys(i["name"] for i in infos))
    name = name or "+".join(names)
    fingerprint = fingerprint_of("merge", MERGE_CODE_VERSION, PACK_FORMAT_VERSION, name,
                                 *(i["fingerprint"] for i in infos))
    out_dir = prepare_output(out, force=force, command="merge", inputs=tuple(paths))
    result = MergeResult(out_dir, up_to_date=True, inputs=len(paths),
                         documents=sum(i["num_documents"] for i in infos),
                         tokens=sum(i["num_tokens"] for i in infos))
    if up_to_date(out_dir, fingerprint):
        result.shards = sum(len(i["shards"]) for i in infos)
        result.seconds = time.perf_counter() - t0
        return result
    result.up_to_date = False
    invalidate(out_dir)

    source_files: dict[str, int] = {}
    shards, files, sources = [], {}, []
    for p, ds, info in zip(paths, datasets, infos):
        lut = np.array([source_files.setdefault(f, len(source_files)) for f in ds.source_files],
                       dtype=np.int32)
        src_offset = len(sources)
        sources.extend(info["sources"])
        if len(sources) > _MAX_SOURCES:
            raise QovaryxDataError(f"merge: the inputs have {len(sources)} sources in all, more than "
                                   f"the {_MAX_SOURCES} the int16 metadata column `source` holds; "
                                   f"merge fewer datasets at once")
        remap = src_offset != 0 or not np.array_equal(lut, np.arange(len(lut)))
        for sh in info["shards"]:
            stem = f"shard-{len(shards):05d}"
            new = {**sh, "tokens": f"{stem}.tok", "offsets": f"{stem}.idx",
                   "meta": f"{stem}.meta.arrow", "images": f"{stem}.img" if sh.get("images") else None}
            for key in ("tokens", "offsets", "images") + (() if remap else ("meta",)):
                if new[key]:
                    linked = _link_or_copy(p / sh[key], out_dir / new[key], link)
                    result.linked += linked
                    result.copied += not linked
                    files[new[key]] = info["files"][sh[key]]
            if remap:
                _rewrite_meta(p / sh["meta"], out_dir / new["meta"], src_offset, lut)
                files[new["meta"]] = file_entry(out_dir / new["meta"])
                result.rewritten += 1
            shards.append(new)

    from qovaryx_data.writer import copy_tokenizer, remove_stale

    copy_tokenizer(datasets[0].tokenizer_dir, out_dir / "tokenizer")
    remove_stale(out_dir, shards)
    write_json_atomic(out_dir / SOURCE_FILES, {"format": SOURCE_FILES_FORMAT,
                                               "version": SOURCE_FILES_VERSION,
                                               "files": list(source_files)})
    files[SOURCE_FILES] = file_entry(out_dir / SOURCE_FILES)
    image_files = _image_files(paths, infos)
    if image_files:
        write_json_atomic(out_dir / IMAGE_FILES, {"format": IMAGE_FILES_FORMAT,
                                                  "version": IMAGE_FILES_VERSION,
                                                  "files": image_files})
        files[IMAGE_FILES] = file_entry(out_dir / IMAGE_FILES)
    else:
        (out_dir / IMAGE_FILES).unlink(missing_ok=True)
    for f in sorted((out_dir / "tokenizer").iterdir()):
        files[f"tokenizer/{f.name}"] = file_entry(f)
    write_dataset_json(out_dir, _merged_info(paths, infos, name, fingerprint, shards, files,
                                             sources, bool(image_files)))
    result.shards = len(shards)
    result.seconds = time.perf_counter() - t0
    return result


def _dataset_folder(p: Path) -> Path:
    if (p / DATASET_JSON).is_file() or not any((p / s / DATASET_JSON).is_file()
                                               for s in ("train", "val")):
        return p        # PackedDataset names what is missing
    raise QovaryxDataError(f"{p}: a pack with a validation split (train/ and val/), not one dataset; "
                           f"merge {p / 'train'} and {p / 'val'} separately")


def _check_compatible(paths: list[Path], infos: list[dict]) -> None:
    """Every input against the first: what a reader or trainer takes from dataset.json as one
    value for the whole dataset must agree."""
    a, first = infos[0], paths[0]

    def refuse(p: Path, what: str, x, y, fix: str) -> None:
        raise QovaryxDataError(f"merge: {first} has {what} {x} but {p} has {y}; {fix}")

    for p, b in zip(paths[1:], infos[1:]):
        if a["tokenizer"]["hash"] != b["tokenizer"]["hash"]:
            refuse(p, "tokenizer hash", a["tokenizer"]["hash"], b["tokenizer"]["hash"],
                   "only datasets packed with the same tokenizer merge (re-pack one with the "
                   "other's tokenizer)")
        if a["dtype"] != b["dtype"]:
            refuse(p, "token dtype", a["dtype"], b["dtype"], "re-pack with one qovaryx version")
        sa, sb = a["separator"], b["separator"]
        if (sa["policy"], sa.get("eos_id")) != (sb["policy"], sb.get("eos_id")):
            refuse(p, "separator", f"{sa['policy']} (eos_id {sa.get('eos_id')})",
                   f"{sb['policy']} (eos_id {sb.get('eos_id')})",
                   "a dataset has one separator policy; re-pack one with the other's `separator:`")
        ia, ib = a.get("images"), b.get("images")
        if ia and ib and list(ia["shape"]) != list(ib["shape"]):
            refuse(p, "image shape", list(ia["shape"]), list(ib["shape"]),
                   "re-pack one with the other's `images:` size and mode")
        da, db = a.get("decision"), b.get("decision")
        if da and db and (da.get("labels"), da.get("num_classes")) != (db.get("labels"),
                                                                       db.get("num_classes")):
            refuse(p, "decision labels", da.get("labels"), db.get("labels"),
                   "a label is stored as its index in the class names, so both must give the "
                   "same `decision_labels` in the same order")


def _link_or_copy(src: Path, dst: Path, link: bool) -> bool:
    """Hard-link `src` to `dst` (copy across file systems or with link=False), atomically via a
    temp name pack's cleanup knows (.shard-NNNNN.tok.tmp); True when linked."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    linked = False
    if link:
        try:
            os.link(src, tmp)
            linked = True
        except OSError as e:
            if e.errno not in _NO_LINK:
                raise
    if not linked:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return linked


def _rewrite_meta(src: Path, dst: Path, src_offset: int, lut: np.ndarray) -> None:
    """The shard's metadata with `source` shifted by `src_offset` and `file` mapped through `lut`
    (the input's source-file index -> the merged list's). The other columns, validity bitmaps
    included, are the input's Arrow buffers as they are (zero-copy from its memory map), written
    out once: a rewrite costs about a copy of the file."""
    import pyarrow as pa

    schema = meta_schema()
    try:
        table = pa.ipc.open_file(pa.memory_map(str(src), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{src}: not a readable Arrow IPC file ({e}); re-pack the input") from None
    md = table.schema.metadata or {}
    version = md.get(META_VERSION_KEY, b"").decode()
    if md.get(META_FORMAT_KEY) != META_FORMAT_VALUE or version.split(".")[0] != str(PACK_FORMAT_MAJOR):
        raise FormatError(f"{src}: schema metadata {md.get(META_FORMAT_KEY)!r} version {version!r}, "
                          f"expected {META_FORMAT_VALUE!r} major {PACK_FORMAT_MAJOR}")
    table = table.select(schema.names).cast(schema).combine_chunks()
    if table.num_rows:
        source = table.column("source").chunk(0).to_numpy() + np.int16(src_offset)
        file = table.column("file").chunk(0).to_numpy()
        shift = int(lut[0]) if len(lut) else 0
        file = file + np.int32(shift) if np.array_equal(lut, np.arange(len(lut)) + shift) else lut[file]
        table = table.set_column(0, schema.field("source"), pa.array(source))
        table = table.set_column(1, schema.field("file"), pa.array(file.astype(np.int32)))
    tmp = dst.with_name(f".{dst.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as w:
            w.write_table(table)          # one record batch, as the format says
    os.replace(tmp, dst)


def _image_files(paths: list[Path], infos: list[dict]) -> list:
    """The union of the inputs' image_files.json records (first record of a path wins)."""
    import json

    seen: dict[str, list] = {}
    for p, info in zip(paths, infos):
        if info.get("image_files"):
            rec = json.loads((p / info["image_files"]).read_text(encoding="utf-8"))
            for r in rec["files"]:
                seen.setdefault(r[0], r)
    return list(seen.values())


def _merged_info(paths, infos, name, fingerprint, shards, files, sources, has_image_files) -> dict:
    from collections import Counter

    from qovaryx_data import __version__

    a = infos[0]
    splits = {i.get("split") for i in infos}
    skipped: Counter = Counter()
    for i in infos:
        skipped.update(i.get("skipped") or {})
    samples = [s for i in infos for s in i.get("skipped_sample") or []][:SKIP_SAMPLE_LIMIT]
    return {
        "format": PACK_FORMAT_NAME, "format_version": PACK_FORMAT_VERSION,
        "created_by": f"qovaryx {__version__} (merge code {MERGE_CODE_VERSION})",
        "name": name,
        "split": splits.pop() if len(splits) == 1 else None,
        "tokenizer": a["tokenizer"],
        "dtype": a["dtype"],
        "separator": a["separator"],
        "images": next((i["images"] for i in infos if i.get("images")), None),
        "decision": next((i["decision"] for i in infos if i.get("decision")), None),
        "num_documents": sum(s["num_documents"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_multimodal_documents": sum(i["num_multimodal_documents"] for i in infos),
        "num_images": sum(s["num_images"] for s in shards),
        "shard_tokens": max(i["shard_tokens"] for i in infos),
        "sources": sources,
        "shards": shards,
        "image_files": IMAGE_FILES if has_image_files else None,
        "source_files_file": SOURCE_FILES,
        "files": files,
        "skipped": dict(sorted(skipped.items())),
        "skipped_sample": samples,
        "fingerprint": fingerprint,
        "manifest": None,
        "merged_from": [{"path": str(p), "name": i["name"], "fingerprint": i["fingerprint"],
                         "documents": i["num_documents"], "tokens": i["num_tokens"]}
                        for p, i in zip(paths, infos)],
    }
