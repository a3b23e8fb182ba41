"""Images in source rows: decode once with Pillow, convert, resize by a documented policy.

The packer calls `load_image` for every row that carries an image and stores the returned uint8
``(H, W, C)`` array as raw pixels; training never decodes an image again. The policies and errors
are described in ``docs/MULTIMODAL.md``.

    >>> spec = ImageSpec(size=(32, 32), mode="L", resize="fit")
    >>> spec.shape
    (32, 32, 1)
"""
from __future__ import annotations

import functools
import io
import math
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from qovaryx_data.errors import ImageError
from qovaryx_data.fileio import atomic_write

# mode -> channels stored per pixel
MODES: dict[str, int] = {"L": 1, "RGB": 3}

# resize policy -> what it does (the functions are in _RESIZERS below)
RESIZE_POLICIES = ("fit", "crop", "stretch")

RESAMPLE = Image.Resampling.BICUBIC  # used whenever a size actually changes

# formats Pillow may open: common raster formats only. Excluded on purpose: EPS (runs
# Ghostscript), and rare plugins nobody needs for training data (smaller attack surface).
IMAGE_FORMATS = ("PNG", "JPEG", "JPEG2000", "GIF", "BMP", "TIFF", "WEBP", "AVIF", "PPM", "TGA",
                 "QOI")


@functools.lru_cache(maxsize=1)
def _open_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)   # AVIF depends on the build

# what Pillow raises for an unreadable, corrupt or truncated image (its decoders use all of these)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error,
                  IndexError)


@dataclass(frozen=True)
class ImageSpec:
    """How every image of a dataset is stored; the manifest's ``images:`` block maps onto it."""

    size: tuple[int, int] = (32, 32)  # (H, W) after resize: every stored image shares it
    mode: str = "L"                   # "L" (grey, 1 channel) or "RGB" (3 channels)
    resize: str = "fit"               # fit: keep aspect, pad with black | crop: cover, center-crop |
                                      # stretch: ignore aspect
    max_pixels: int = 40_000_000      # refuse larger images from their header, before decoding

    def __post_init__(self) -> None:
        size = self.size
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
            raise ValueError(f"images.size must be [H, W] (two positive integers), got {size!r}")
        if size[0] < 1 or size[1] < 1:
            raise ValueError(f"images.size must be positive, got {list(size)}")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        if self.mode not in MODES:
            raise ValueError(f"images.mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.resize not in RESIZE_POLICIES:
            raise ValueError(f"images.resize must be one of {list(RESIZE_POLICIES)}, got {self.resize!r}")
        mp = self.max_pixels
        if not isinstance(mp, int) or isinstance(mp, bool) or mp < 1:
            raise ValueError(f"images.max_pixels must be a positive integer, got {mp!r}")
        if mp < self.size[0] * self.size[1]:
            raise ValueError(f"images.max_pixels ({mp}) is smaller than images.size "
                             f"{list(self.size)} ({self.size[0] * self.size[1]} pixels): raise it")

    @property
    def channels(self) -> int:
        return MODES[self.mode]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every stored image."""
        return (self.size[0], self.size[1], self.channels)

    @property
    def nbytes(self) -> int:
        return self.size[0] * self.size[1] * self.channels

    def to_dict(self) -> dict[str, Any]:
        """For dataset.json (and the fingerprint of a pack run)."""
        return {"size": list(self.size), "mode": self.mode, "resize": self.resize,
                "max_pixels": self.max_pixels}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageSpec:
        """From a manifest's ``images:`` block; an unknown key is a ValueError naming it."""
        unknown = set(d) - {"size", "mode", "resize", "max_pixels"}
        if unknown:
            raise ValueError(f"images: unknown key(s) {sorted(unknown)}; "
                             "allowed: size, mode, resize, max_pixels")
        kw = dict(d)
        if isinstance(kw.get("size"), list):
            kw["size"] = tuple(kw["size"])
        return cls(**kw)


# ---- resize policies: PIL image already in spec.mode -> PIL image of exactly (W, H) ----
# Each returns the image untouched when it already has the target size (pixels kept exactly).

def _fit(img: Image.Image, wh: tuple[int, int]) -> Image.Image:
    return ImageOps.pad(img, wh, method=RESAMPLE, color=0, centering=(0.5, 0.5))


def _crop(img: Image.Image, wh: tuple[int, int]) -> Image.Image:
    return ImageOps.fit(img, wh, method=RESAMPLE, centering=(0.5, 0.5))


def _stretch(img: Image.Image, wh: tuple[int, int]) -> Image.Image:
    return img.resize(wh, resample=RESAMPLE)


_RESIZERS = {"fit": _fit, "crop": _crop, "stretch": _stretch}


@functools.lru_cache(maxsize=256)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _resolve_inside(value: str, root: Path, where: str, err: dict) -> str:
    """root/value resolved (symlinks followed); refuse anything that lands outside root."""
    root_r = _real_root(os.fspath(root))
    target = os.path.realpath(os.path.join(root_r, value))   # an absolute value replaces root
    if os.path.commonpath([root_r, target]) != root_r:
        raise ImageError(f"{where}: image path {value!r} resolves to {target}, outside the source's "
                         f"folder {root_r}; image paths must stay inside the folder of the source file "
                         "(no '..', absolute paths or symlinks leading out)",
                         reason="path_escape", **err)
    return target


def _to_8bit(img: Image.Image) -> Image.Image:
    """A single-channel image with more than 8 bits per sample as "L", by a fixed scale.

    Pillow's own ``convert("L")`` clips these at 255, turning a 16-bit image almost all white.
    The scale depends only on the mode, never on the image's content, so equal source values
    give equal stored pixels in every image (docs/MULTIMODAL.md, "Convert"):

    * ``I;16`` / ``I;16L`` / ``I;16B`` / ``I;16N`` (16-bit PNG, TIFF): ``v >> 8``;
    * ``I`` (32-bit signed; what Pillow decodes 16-bit PGM/PPM and 32-bit integer TIFF to):
      taken as the same 0..65535 range, clipped to it, then ``>> 8``;
    * ``F`` (32-bit float TIFF): Pillow's convention that F shares L's 0..255 scale (``L -> F``
      is the identity): rounded to the nearest integer, clipped to 0..255, NaN -> 0.

    A transparent value (a 16-bit PNG's tRNS, ``info["transparency"]``) becomes 0, as transparent
    pixels of other modes are composited over black. Other modes are returned unchanged.

        >>> _to_8bit(Image.new("I;16", (1, 1), 0x1234)).getpixel((0, 0)) == 0x12
        True
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img)                             # uint16 (either byte order) or int32
        out = (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        out = np.clip(np.rint(np.nan_to_num(a, nan=0.0)), 0, 255).astype(np.uint8)
    else:
        return img
    t = img.info.get("transparency")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        out[a == t] = 0
    return Image.fromarray(out)


def _convert(img: Image.Image, mode: str) -> Image.Image:
    """To `mode`; transparent pixels are composited over black (the padding colour).
    High-bit-depth single-channel images are scaled to 8 bits first (`_to_8bit`)."""
    img = _to_8bit(img)
    if img.mode == mode:
        return img
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        flat.alpha_composite(rgba)
        img = flat
    return img.convert(mode)


@dataclass(frozen=True)
class ImageFile:
    """An image file's bytes, read once by `read_image_file` (hash them, decode them)."""

    name: str        # the path as the row gave it (for messages)
    path: str        # the file read: symlinks resolved, inside the source's folder
    data: bytes      # its whole content
    size: int        # st_size and st_mtime_ns of the opened file, taken before reading it
    mtime_ns: int


def read_image_file(value: str | os.PathLike, *, root: Path, where: str,
                    source: str | None = None, row: int | None = None) -> ImageFile:
    """Read the image file named by `value` (a path relative to `root`) once, after refusing an
    empty path (``missing_image``), one that resolves outside `root`, symlinks included
    (``path_escape``), and one that is missing or not a regular file (``missing_image``).
    Nothing is decoded here: pass the result to `load_image` (the header's size is checked
    there, before decoding).
    """
    err = {"path": source, "row": row}
    value = os.fspath(value)
    if not value:
        raise ImageError(f"{where}: empty image path", reason="missing_image", **err)
    target = _resolve_inside(value, root, where, err)

    def missing() -> ImageError:
        state = "is not a file" if os.path.exists(target) else "does not exist"
        return ImageError(f"{where}: image file {value!r} ({target}) {state}; fix the path "
                          "(relative to the source file's folder) or remove the image field",
                          reason="missing_image", **err)

    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)
    try:   # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below)
        fd = os.open(target, flags)
    except OSError as e:
        if not os.path.isfile(target):
            raise missing() from e
        raise _unreadable(f"{where}: image file {value!r}", e, err) from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise missing()
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read()
        except OSError as e:
            raise _unreadable(f"{where}: image file {value!r}", e, err) from e
    return ImageFile(value, target, data, st.st_size, st.st_mtime_ns)


def _unreadable(what: str, e: BaseException, err: dict) -> ImageError:
    return ImageError(f"{what} is corrupt or truncated and cannot be decoded "
                      f"({type(e).__name__}: {e}); replace the file or remove the row",
                      reason="corrupt_image", **err)


def load_image(value: bytes | bytearray | memoryview | str | os.PathLike | ImageFile, *,
               root: Path, spec: ImageSpec, where: str, source: str | None = None,
               row: int | None = None) -> np.ndarray:
    """Decode one image (encoded bytes, a path relative to `root`, or an `ImageFile` already
    read) to uint8 ``spec.shape``. A path is read with `read_image_file` (its checks apply).

    `where` locates the row in messages (e.g. ``"data/x.jsonl row 17"``); `source` and `row`
    become the raised ImageError's ``.path``/``.row`` (so a skip can be listed). Reasons:
    ``missing_image``, ``corrupt_image``, ``image_too_large``, ``path_escape``.

        >>> png = io.BytesIO(); Image.new("L", (3, 2), 7).save(png, "PNG")
        >>> load_image(png.getvalue(), root=Path("."), where="x", spec=ImageSpec(size=(2, 3))).shape
        (2, 3, 1)
    """
    err = {"path": source, "row": row}
    if isinstance(value, (str, os.PathLike)):
        value = read_image_file(value, root=root, where=where, source=source, row=row)
    if isinstance(value, ImageFile):
        fp: Any = io.BytesIO(value.data)
        what = f"image file {value.name!r}"
    elif isinstance(value, (bytes, bytearray, memoryview)):
        fp = io.BytesIO(bytes(value))
        what = f"image bytes ({len(value)} B)"
    else:
        raise ImageError(f"{where}: image field must be a path string or encoded bytes, "
                         f"got {type(value).__name__}", reason="corrupt_image", **err)

    with warnings.catch_warnings():
        # Pillow only warns between its limit and twice its limit: that is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(fp, formats=_open_formats()) as img:   # lazy: reads the header
                w, h = img.size
                if w * h > spec.max_pixels:
                    raise ImageError(f"{where}: {what} is {w}x{h} = {w * h} pixels, over "
                                     f"images.max_pixels = {spec.max_pixels} (refused before "
                                     "decoding); shrink the image or raise max_pixels",
                                     reason="image_too_large", **err)
                img.load()                                   # the one decode
                ImageOps.exif_transpose(img, in_place=True)  # camera orientation, if tagged
                img = _convert(img, spec.mode)
                img = _RESIZERS[spec.resize](img, (spec.size[1], spec.size[0]))
                arr = np.asarray(img, dtype=np.uint8)
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{where}: {what} refused as a decompression bomb by Pillow ({e}); "
                             f"images over min(images.max_pixels, PIL.Image.MAX_IMAGE_PIXELS = "
                             f"{Image.MAX_IMAGE_PIXELS}) pixels are refused",
                             reason="image_too_large", **err) from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{where}: {what} is not an image in a supported format "
                             f"({', '.join(_open_formats())}), or its header is corrupt; convert it "
                             "or remove the row", reason="corrupt_image", **err) from e
        except _DECODE_ERRORS as e:
            raise _unreadable(f"{where}: {what}", e, err) from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    assert arr.shape == spec.shape, (arr.shape, spec.shape)
    return np.ascontiguousarray(arr)


def to_pil(image: np.ndarray) -> Image.Image:
    """A stored uint8 (H, W, C) array (C = 1 or 3) as a PIL image ("L" or "RGB")."""
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(image[:, :, 0]))
    if image.ndim == 3 and image.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(image))
    if image.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(image))
    raise ValueError(f"expected a uint8 (H, W, 1|3) image, got shape {image.shape}")


def contact_sheet(images: list[np.ndarray], labels: list[str | None], out: Path, *,
                  cell: int = 96, columns: int | None = None) -> Path:
    """Write a PNG grid of `images` (uint8 H×W×C) each with its label underneath; returns `out`.

    Small images are enlarged (nearest neighbour, integer factor) to about `cell` pixels so they
    can be seen. Used by ``qovaryx-data inspect --images out.png``. Written atomically.
    """
    if len(images) != len(labels):
        raise ValueError(f"contact_sheet: {len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("contact_sheet: no images to draw (the dataset has no image rows)")
    out = Path(out)
    n = len(images)
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = []
    for a in images:
        im = to_pil(a).convert("RGB")
        k = max(1, cell // max(im.size))
        if k > 1:
            im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
        tiles.append(im)
    font = ImageFont.load_default(size=12)
    text_h = 16
    cw = max(t.width for t in tiles) + 8
    ch = max(t.height for t in tiles) + text_h + 8
    sheet = Image.new("RGB", (cols * cw, rows * ch), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (t, label) in enumerate(zip(tiles, labels)):
        x, y = (i % cols) * cw + 4, (i // cols) * ch + 4
        sheet.paste(t, (x, y))
        draw.text((x, y + t.height + 1), "-" if label is None else str(label), fill=(0, 0, 0),
                  font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))
