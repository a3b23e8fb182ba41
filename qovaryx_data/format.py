"""The packed format's constants and binary headers: magic, version, dtype codes, the dtype rule,
the per-row metadata schema and the file checksum. The writer (packer.py) and the readers
(reader.py) both take the on-disk contract from here.

Every binary file of a packed dataset starts with the same 64-byte little-endian header
(see docs/FORMAT.md, the public contract):

    offset size  field
    0      8     magic           b"QVXTOK\\0\\0" tokens, b"QVXIDX\\0\\0" offsets, b"QVXIMG\\0\\0" pixels
    8      2     major version   readers refuse a major version they do not know
    10     2     minor version   additions a reader of the same major may ignore
    12     1     dtype code      1 uint8, 2 uint16, 3 uint32, 4 int64
    13     3     reserved        zero
    16     8     count           number of items that follow (tokens, offsets, images)
    24     4×3   item shape      (H, W, C) for images; (0, 0, 0) otherwise
    36     28    reserved        zero
    64     ...   payload         count items, little-endian, starting 8-byte aligned

Example: a token shard of 5 uint16 tokens is 64 + 10 = 74 bytes; `read_header` of it returns
``Header(kind="tokens", major=1, minor=0, dtype=uint16, count=5, item_shape=(0, 0, 0))``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from qovaryx_data.errors import FormatError

# The packed dataset format (docs/FORMAT.md); the model's checkpoint layout has its own version
# (qovaryx_model.config).
PACK_FORMAT_NAME = "qovaryx-packed"
PACK_FORMAT_MAJOR = 1
PACK_FORMAT_MINOR = 1   # 1.1: source_files in a side file (docs/FORMAT.md "Versioning")
PACK_FORMAT_VERSION = f"{PACK_FORMAT_MAJOR}.{PACK_FORMAT_MINOR}"

HEADER_SIZE = 64
_HEADER = struct.Struct("<8sHHB3xQ3I28x")
assert _HEADER.size == HEADER_SIZE

# file kind -> magic bytes on the first 8 bytes
MAGIC = {
    "tokens": b"QVXTOK\0\0",
    "offsets": b"QVXIDX\0\0",
    "images": b"QVXIMG\0\0",
}
_KIND_OF_MAGIC = {v: k for k, v in MAGIC.items()}

# dtype code <-> numpy dtype (always little-endian on disk)
DTYPE_CODES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 3: np.dtype("<u4"), 4: np.dtype("<i8")}
_CODE_OF_DTYPE = {v: k for k, v in DTYPE_CODES.items()}

# the Arrow metadata file carries its format/version in the schema metadata under these keys
META_FORMAT_KEY = b"qovaryx.format"
META_FORMAT_VALUE = b"qovaryx-meta"
META_VERSION_KEY = b"qovaryx.version"

ALIGN = 8

# image_files.json: (path, size, mtime_ns) of every image file a pack read
IMAGE_FILES = "image_files.json"
IMAGE_FILES_FORMAT = "qovaryx-image-files"
IMAGE_FILES_VERSION = 1
# source_files.json (since 1.1): the files rows came from, indexed by the metadata column `file`;
# read on demand (dataset.json stays O(shards), whatever the number of input files)
SOURCE_FILES = "source_files.json"
SOURCE_FILES_FORMAT = "qovaryx-source-files"
SOURCE_FILES_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype rule: uint16 when every possible id (0 .. vocab_size-1, added tokens included)
    fits, else uint32.

    >>> token_dtype(65_536), token_dtype(65_537)
    (dtype('uint16'), dtype('uint32'))
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def dtype_name(dtype: np.dtype) -> str:
    """'uint16' / 'uint32' / 'int64' / 'uint8' (the name dataset.json uses)."""
    return np.dtype(dtype).newbyteorder("=").name


def padded(nbytes: int) -> int:
    """nbytes rounded up to the 8-byte alignment."""
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Header:
    kind: str  # tokens | offsets | images
    major: int
    minor: int
    dtype: np.dtype
    count: int
    item_shape: tuple[int, int, int] = (0, 0, 0)

    @property
    def item_bytes(self) -> int:
        """Bytes of one item on disk (images are padded to 8 bytes each)."""
        if self.kind == "images":
            h, w, c = self.item_shape
            return padded(h * w * c)
        return self.dtype.itemsize

    @property
    def file_size(self) -> int:
        """Exact size of a complete file with this header."""
        return HEADER_SIZE + padded(self.count * self.item_bytes)


def pack_header(kind: str, dtype: np.dtype, count: int,
                item_shape: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """The 64 header bytes for a file of `kind` holding `count` items of `dtype`."""
    return _HEADER.pack(MAGIC[kind], PACK_FORMAT_MAJOR, PACK_FORMAT_MINOR, _CODE_OF_DTYPE[np.dtype(dtype)],
                        count, *item_shape)


def parse_header(raw: bytes, path: str | Path, expect_kind: str) -> Header:
    """Parse and check the first 64 bytes of `path`; FormatError saying found vs expected."""
    if len(raw) < HEADER_SIZE:
        raise FormatError(f"{path}: file is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte "
                          f"header: it is truncated or not a qovaryx file (re-run pack)")
    magic, major, minor, code, count, h, w, c = _HEADER.unpack(raw[:HEADER_SIZE])
    want = MAGIC[expect_kind]
    if magic != want:
        found = _KIND_OF_MAGIC.get(magic)
        what = f"the magic of a {found} file" if found else f"magic {magic!r}"
        raise FormatError(f"{path}: found {what}, expected {want!r} ({expect_kind} file of "
                          f"format {PACK_FORMAT_NAME}); the file is corrupt or not what dataset.json says")
    if major != PACK_FORMAT_MAJOR:
        raise FormatError(f"{path}: format version {major}.{minor}, this reader supports major "
                          f"version {PACK_FORMAT_MAJOR} (written as {PACK_FORMAT_VERSION}); re-pack the data "
                          f"or use a matching qovaryx release")
    if code not in DTYPE_CODES:
        raise FormatError(f"{path}: unknown dtype code {code}, expected one of {sorted(DTYPE_CODES)}")
    return Header(expect_kind, major, minor, DTYPE_CODES[code], count, (h, w, c))


def read_header(path: str | Path, expect_kind: str, *, check_size: bool = True) -> Header:
    """Read and check the header of `path`; with check_size, refuse a file whose size on disk is
    not the size the header implies (a truncated or overlong file)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise FormatError(f"{path}: missing, expected a {expect_kind} file listed in dataset.json "
                          f"(the dataset is incomplete; re-run pack)") from None
    header = parse_header(raw, path, expect_kind)
    if check_size:
        size = path.stat().st_size
        if size != header.file_size:
            raise FormatError(f"{path}: {size} bytes on disk, expected {header.file_size} "
                              f"({header.count} {expect_kind} items): the file is truncated or "
                              f"damaged (run `qovaryx-data verify`, then re-pack)")
    return header


# (column, numpy dtype, nullable): shard-NNNNN.meta.arrow, one row per document
META_COLUMNS = (
    ("source", np.int16, False),            # index into dataset.json sources
    ("file", np.int32, False),              # index into source_files (source_files.json)
    ("row", np.int64, False),               # row / line within that file
    ("decision", np.int8, True),            # class 0..3; null: no label
    ("decision_position", np.int32, True),  # index into the row's tokens; null: no label
    ("image", np.int32, True),              # index into the shard's .img; null: no image
)


def meta_schema():
    """Arrow schema of shard-NNNNN.meta.arrow, format and version in its metadata."""
    import pyarrow as pa

    return pa.schema([pa.field(name, pa.from_numpy_dtype(dt), nullable=null)
                      for name, dt, null in META_COLUMNS],
                     metadata={META_FORMAT_KEY: META_FORMAT_VALUE,
                               META_VERSION_KEY: PACK_FORMAT_VERSION.encode()})


def file_entry(path: Path) -> dict:
    """{"bytes": size, "xxh3_128": hex} of one file, streamed in 8 MiB blocks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return {"bytes": path.stat().st_size, "xxh3_128": h.hexdigest()}
