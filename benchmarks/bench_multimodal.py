"""Random access to image rows: PackedDataset vs decoding the PNG with Pillow on every access.

Writes N Fashion-MNIST images (../shared/images) as PNG files plus a JSONL source (caption +
label), packs them, then reads K random image rows both ways, each copied into a fresh array as a
batch builder would:

* packed:   ``np.array(ds[i].image)``           (a memmap view, copied)
* baseline: ``Image.open(png); .convert("L")``  (open + decode per access; the least a loader
  that keeps PNG files must do), and the full ``load_image`` path for reference.

Prints the speed ratio (goal >= 20x) and the bytes per image packed vs PNG. Ratios are measured
in the same run; best of `--repeats`. Runs in well under a minute on 2 CPU cores:

    .venv/bin/python benchmarks/bench_multimodal.py [--images 2000] [--accesses 20000]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fmnist import load_fashion_mnist, write_png_source  # noqa: E402

from qovaryx_data import PackedDataset, train_bpe  # noqa: E402
from qovaryx_data.images import ImageSpec, load_image  # noqa: E402
from qovaryx_data.packer import pack  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="images to write and pack")
    ap.add_argument("--accesses", type=int, default=20000, help="random reads per method")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images-dir", default=str(REPO.parent / "shared" / "images"),
                    help="folder with the Fashion-MNIST IDX .gz files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_mm_") as tmp:
        work = Path(tmp)
        images, labels = load_fashion_mnist(Path(args.images_dir), args.images)
        jsonl = write_png_source(work / "src", images, labels)
        train_bpe([str(jsonl)], out=work / "tok", vocab_size=300, format="jsonl")
        manifest = {"name": "bench_mm", "tokenizer": "tok", "output": "out",
                    "images": {"size": [28, 28], "mode": "L", "resize": "fit"},
                    "sources": [{"path": "src/rows.jsonl", "format": "jsonl",
                                 "image_field": "image", "decision_field": "label"}]}
        (work / "pack.yaml").write_text(json.dumps(manifest), encoding="utf-8")  # JSON is YAML
        pack(work / "pack.yaml", progress=False)
        ds = PackedDataset(work / "out")
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]

        rng = np.random.default_rng(args.seed)
        idx = rng.choice(ds.multimodal_doc_indices, size=args.accesses).tolist()
        paths = [str(work / "src" / rows[ds[i].row - 1]["image"]) for i in idx]
        # same pixels both ways (sanity check, not timed)
        for i, p in zip(idx[:50], paths[:50]):
            assert np.array_equal(ds[i].image[:, :, 0], np.asarray(Image.open(p)))

        def packed():
            for i in idx:
                np.array(ds[i].image)

        def pillow():
            for p in paths:
                with Image.open(p) as im:
                    np.asarray(im.convert("L"))

        spec = ImageSpec(size=(28, 28), mode="L", resize="fit")
        root = work / "src"

        def full_load():
            for p in paths:
                load_image(p, root=root, spec=spec, where="bench")

        t_packed = best_of(packed, args.repeats)
        t_pillow = best_of(pillow, args.repeats)
        t_full = best_of(full_load, args.repeats)

        png_bytes = sum((work / "src" / r["image"]).stat().st_size for r in rows)
        img_files = sorted((work / "out").glob("*.img"))
        img_file_bytes = sum(f.stat().st_size for f in img_files)
        n = args.images
        k = args.accesses
        print(f"bench_multimodal: {n} Fashion-MNIST 28x28 images, {k} random accesses, "
              f"best of {args.repeats}")
        print(f"  packed  ds[i].image copied : {k / t_packed:12,.0f} images/s")
        print(f"  Pillow  open + decode PNG  : {k / t_pillow:12,.0f} images/s")
        print(f"  load_image (open, checks, decode, convert, resize): {k / t_full:,.0f} images/s")
        print(f"  ratio packed / Pillow      : {t_pillow / t_packed:8.1f}x   (goal >= 20x)")
        print(f"  ratio packed / load_image  : {t_full / t_packed:8.1f}x")
        print(f"  bytes per image: packed {spec.nbytes} B raw pixels "
              f"({img_file_bytes / n:.1f} B/image incl. the .img header), "
              f"PNG {png_bytes / n:.1f} B/image; packed / PNG = {img_file_bytes / png_bytes:.2f}x")


if __name__ == "__main__":
    main()
