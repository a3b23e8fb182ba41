"""qovaryx_data.images: ImageSpec, load_image (policies, errors), contact_sheet -- on real images."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist import load_fashion_mnist
from qovaryx_data.errors import ImageError, SourceError
from qovaryx_data.images import ImageSpec, contact_sheet, load_image, to_pil

L28 = ImageSpec(size=(28, 28), mode="L", resize="fit")


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


# ---- ImageSpec ----

@pytest.mark.parametrize("kw, field", [
    ({"size": (0, 4)}, "size"), ({"size": (4,)}, "size"), ({"size": (4.0, 4)}, "size"),
    ({"size": "32"}, "size"), ({"mode": "RGBA"}, "mode"), ({"resize": "pad"}, "resize"),
    ({"max_pixels": 0}, "max_pixels"), ({"max_pixels": 10, "size": (32, 32)}, "max_pixels"),
])
def test_spec_rejects_bad_fields(kw, field):
    with pytest.raises(ValueError, match=rf"images\.{field}"):
        ImageSpec(**kw)


def test_spec_from_manifest_block():
    spec = ImageSpec.from_dict({"size": [32, 24], "mode": "RGB", "resize": "crop",
                                "max_pixels": 40_000_000})
    assert spec.size == (32, 24) and spec.shape == (32, 24, 3) and spec.nbytes == 32 * 24 * 3
    assert ImageSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown key.*'sizes'"):
        ImageSpec.from_dict({"sizes": [32, 32]})


# ---- decoding real images ----

def test_fashion_mnist_png_pixels_exact(fashion_mnist_dir, tmp_path):
    images, _ = load_fashion_mnist(fashion_mnist_dir, 20)
    for i, a in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(_png(a))
        for policy in ("fit", "crop", "stretch"):
            spec = ImageSpec(size=(28, 28), mode="L", resize=policy)
            got = load_image(f"{i}.png", root=tmp_path, spec=spec, where=f"r {i}")
            assert got.dtype == np.uint8 and got.shape == (28, 28, 1) and got.flags.c_contiguous
            np.testing.assert_array_equal(got[:, :, 0], a)
    # bytes give the same as the file; RGB replicates the grey channel
    rgb = load_image(_png(images[0]), root=tmp_path, spec=ImageSpec(size=(28, 28), mode="RGB"),
                     where="b")
    assert rgb.shape == (28, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], images[0])


def test_rgb_to_grey_matches_pillow(fashion_mnist_dir):
    images, _ = load_fashion_mnist(fashion_mnist_dir, 3)
    a = np.stack([images[0], images[1], images[2]], axis=-1)   # a real RGB image
    got = load_image(_png(a), root=Path("."), spec=L28, where="x")
    np.testing.assert_array_equal(got[:, :, 0], np.asarray(Image.fromarray(a).convert("L")))


def _halves(h: int, w: int) -> np.ndarray:
    """Left half white, right half black."""
    a = np.zeros((h, w), np.uint8)
    a[:, : w // 2] = 255
    return a


def test_resize_policies_known_answers():
    src = _png(_halves(20, 40))                  # H=20, W=40 -> target 20x20
    where = "x"
    crop = load_image(src, root=Path("."), where=where,
                      spec=ImageSpec(size=(20, 20), resize="crop"))[:, :, 0]
    # center crop = columns 10..29 of the source, no resampling (same scale)
    np.testing.assert_array_equal(crop, _halves(20, 40)[:, 10:30])
    fit = load_image(src, root=Path("."), where=where,
                     spec=ImageSpec(size=(20, 20), resize="fit"))[:, :, 0]
    # scaled to 10x20 (aspect kept), padded with black: rows 0-4 and 15-19 are padding
    assert (fit[:5] == 0).all() and (fit[15:] == 0).all()
    assert fit[5:15, :8].min() >= 250 and fit[5:15, 12:].max() <= 5
    stretch = load_image(src, root=Path("."), where=where,
                         spec=ImageSpec(size=(20, 20), resize="stretch"))[:, :, 0]
    assert stretch[:, :9].min() >= 250 and stretch[:, 11:].max() <= 5
    # upscaling works too and keeps the requested shape
    big = load_image(src, root=Path("."), where=where,
                     spec=ImageSpec(size=(64, 48), mode="RGB", resize="fit"))
    assert big.shape == (64, 48, 3)


def test_transparency_composited_over_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:2, :, 3] = 255                        # top opaque, bottom fully transparent
    got = load_image(_png(rgba), root=Path("."), where="x", spec=ImageSpec(size=(4, 4)))[:, :, 0]
    assert (got[:2] == 200).all() and (got[2:] == 0).all()


# ---- more than 8 bits per sample: a fixed scale to 8 bits (images._to_8bit) ----

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def test_16bit_png_gradient_scaled_not_clipped():
    # a real 16-bit greyscale PNG: a horizontal gradient over the whole 0..65535 range
    g = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))     # (8, 64)
    png = _encoded(Image.fromarray(g), "PNG")
    with Image.open(io.BytesIO(png)) as im:
        assert im.mode == "I;16"                        # what Pillow decodes it to
    want = (g >> 8).astype(np.uint8)
    assert want.min() == 0 and want.max() == 255 and len(np.unique(want)) == 64
    got = load_image(png, root=Path("."), where="x", spec=ImageSpec(size=(8, 64)))
    np.testing.assert_array_equal(got[:, :, 0], want)
    rgb = load_image(png, root=Path("."), where="x", spec=ImageSpec(size=(8, 64), mode="RGB"))
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], want)
    # Pillow's own convert("L") would have clipped: everything from 256 up is white
    assert (np.asarray(Image.fromarray(g).convert("L")) == 255).mean() > 0.9
    # a 16-bit transparent value (tRNS) is composited over black like any transparent pixel
    t = int(g[0, 40])
    got = load_image(_encoded(Image.fromarray(g), "PNG", transparency=t), root=Path("."),
                     where="x", spec=ImageSpec(size=(8, 64)))[:, :, 0]
    np.testing.assert_array_equal(got, np.where(g == t, 0, want))


def test_big_endian_int32_and_float_images_scaled_by_fixed_policy():
    # I;16B (big-endian 16-bit TIFF): v >> 8, like I;16
    g = np.array([[0, 255, 256, 4660], [32768, 40000, 65280, 65535]], dtype=">u2")
    im = Image.frombytes("I;16B", (4, 2), g.tobytes())
    tif = _encoded(im, "TIFF")
    with Image.open(io.BytesIO(tif)) as r:
        assert r.mode == "I;16B"
    spec = ImageSpec(size=(2, 4))
    got = load_image(tif, root=Path("."), where="x", spec=spec)[:, :, 0]
    assert got.tolist() == [[0, 0, 1, 18], [128, 156, 255, 255]]
    # I (32-bit signed TIFF): the 16-bit range, clipped to 0..65535, then >> 8
    i32 = np.array([[-5, 0, 255, 4660], [65535, 65536, 10**6, 2**31 - 1]], dtype=np.int32)
    tif = _encoded(Image.fromarray(i32), "TIFF")
    with Image.open(io.BytesIO(tif)) as r:
        assert r.mode == "I"
    got = load_image(tif, root=Path("."), where="x", spec=spec)[:, :, 0]
    assert got.tolist() == [[0, 0, 0, 18], [255, 255, 255, 255]]
    # F (32-bit float TIFF): on L's 0..255 scale, rounded, clipped, NaN -> 0
    f = np.array([[-3.0, 0.4, 0.6, 127.5], [254.4, 300.0, np.nan, np.inf]], dtype=np.float32)
    tif = _encoded(Image.fromarray(f), "TIFF")
    with Image.open(io.BytesIO(tif)) as r:
        assert r.mode == "F"
    got = load_image(tif, root=Path("."), where="x", spec=spec)[:, :, 0]
    assert got.tolist() == [[0, 0, 1, 128], [254, 255, 0, 255]]


# ---- bad input: each an ImageError with its reason, naming the row ----

def _raises(reason: str, value, root: Path, spec: ImageSpec = L28) -> ImageError:
    with pytest.raises(ImageError) as ei:
        load_image(value, root=root, spec=spec, where="src/rows.jsonl row 17",
                   source="src/rows.jsonl", row=17)
    e = ei.value
    assert e.reason == reason, str(e)
    assert isinstance(e, SourceError) and e.path == "src/rows.jsonl" and e.row == 17
    assert "src/rows.jsonl row 17" in str(e)
    return e


def test_missing_and_not_a_file(tmp_path):
    assert "does not exist" in str(_raises("missing_image", "nope.png", tmp_path))
    (tmp_path / "d").mkdir()
    assert "not a file" in str(_raises("missing_image", "d", tmp_path))
    _raises("missing_image", "", tmp_path)


def test_corrupt_and_truncated(fashion_mnist_dir, tmp_path):
    images, _ = load_fashion_mnist(fashion_mnist_dir, 1)
    png = _png(images[0])
    _raises("corrupt_image", b"this is not an image", tmp_path)
    _raises("corrupt_image", png[: len(png) // 2], tmp_path)              # truncated
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 30])
    _raises("corrupt_image", "cut.png", tmp_path)
    bad = bytearray(png)
    bad[60:80] = b"\xff" * 20                                              # flipped bytes in IDAT
    _raises("corrupt_image", bytes(bad), tmp_path)
    _raises("corrupt_image", 12345, tmp_path)                             # not bytes nor a path


def _bomb(w: int, h: int) -> bytes:
    """A real PNG of w*h pixels that compresses to a few KB (1-bit, all black)."""
    b = io.BytesIO()
    Image.new("1", (w, h)).save(b, format="PNG")
    return b.getvalue()


def test_decompression_bomb_refused_from_header_before_decoding(tmp_path):
    bomb = _bomb(8000, 6000)                     # 48 M pixels > default max_pixels 40 M
    assert len(bomb) < 100_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    e = _raises("image_too_large", "bomb.png", tmp_path, ImageSpec(size=(28, 28)))
    assert "48000000 pixels" in str(e) and "before decoding" in str(e)
    # proof that the check precedes decoding: the same header with its pixel data cut off would
    # be a corrupt image if it were decoded, yet it is refused as too large
    _raises("image_too_large", bomb[:200], tmp_path, ImageSpec(size=(28, 28)))
    small = ImageSpec(size=(28, 28), max_pixels=1000)
    _raises("image_too_large", _png(np.zeros((40, 40), np.uint8)), tmp_path, small)


def test_pillow_bomb_warning_is_an_error(tmp_path):
    # between Pillow's MAX_IMAGE_PIXELS and twice it, Pillow only warns: we refuse it anyway,
    # even when the spec's own limit is higher
    n = Image.MAX_IMAGE_PIXELS
    w = 10_000
    h = n // w + 1
    spec = ImageSpec(size=(28, 28), max_pixels=2 * n)
    e = _raises("image_too_large", _bomb(w, h), tmp_path, spec)
    assert "decompression bomb" in str(e)


def test_path_escape(tmp_path):
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(np.zeros((28, 28), np.uint8)))
    _raises("path_escape", "../secret.png", root)
    _raises("path_escape", "img/../../secret.png", root)
    _raises("path_escape", str(outside), root)                           # absolute
    os.symlink(outside, root / "img" / "link.png")                        # symlink out
    _raises("path_escape", "img/link.png", root)
    os.symlink(tmp_path, root / "up")                                     # symlinked folder out
    _raises("path_escape", "up/secret.png", root)
    # inside the root all of these are fine
    inside = root / "img" / "ok.png"
    inside.write_bytes(_png(np.full((28, 28), 9, np.uint8)))
    os.symlink(inside, root / "alias.png")
    for value in ("img/ok.png", "img/../img/ok.png", "alias.png", str(inside)):
        assert load_image(value, root=root, spec=L28, where="x")[0, 0, 0] == 9


# ---- contact sheet ----

def test_contact_sheet(fashion_mnist_dir, tmp_path):
    images, labels = load_fashion_mnist(fashion_mnist_dir, 7)
    out = contact_sheet([a[:, :, None] for a in images], [str(y) for y in labels[:-1]] + [None],
                        tmp_path / "sheet" / "s.png")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # 7 images -> 3 columns x 3 rows of cells of (28*3 + 8) x (28*3 + 16 + 8)
        assert im.size == (3 * 92, 3 * 108)
        sheet = np.asarray(im)
    # the first image is drawn enlarged 3x (nearest) at (4, 4)
    np.testing.assert_array_equal(sheet[4:4 + 84:3, 4:4 + 84:3, 0], images[0])
    assert list(tmp_path.joinpath("sheet").iterdir()) == [out]               # no temp left behind
    with pytest.raises(ValueError, match="labels"):
        contact_sheet([images[0][:, :, None]], [], tmp_path / "x.png")
    with pytest.raises(ValueError, match="uint8"):
        to_pil(np.zeros((2, 2, 1), np.float32))


def test_unsupported_format_refused(tmp_path):
    # EPS would make Pillow run Ghostscript: it is not among the formats we open
    eps = io.BytesIO()
    Image.new("L", (8, 8), 128).save(eps, format="EPS")
    e = _raises("corrupt_image", eps.getvalue(), tmp_path)
    assert "supported format" in str(e) and "PNG" in str(e)
    for fmt in ("JPEG", "BMP", "TIFF", "WEBP", "GIF"):                  # the common ones open
        b = io.BytesIO()
        Image.new("L", (28, 28), 77).save(b, format=fmt)
        assert load_image(b.getvalue(), root=tmp_path, spec=L28, where="x").shape == (28, 28, 1)
