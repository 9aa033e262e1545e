"""Cutting patches: crop-by-crop preprocessing vs uint8 crops normalised a batch at a time.

    .venv/bin/python bench/patch_cutting.py [--images 64 --workers 0]

resnet50@random, layers conv1, layer1..layer4 (3,904 units, k=10), on the real_scale bench's
generated JPEGs; `extract_patches` with the OpenCLIP ViT-B-32 preprocessing and no encoder forward
(which a GPU does), twice each, alternating (the first call of a process pays warm-up; compare the
second ones). Both give the same patches. Ends with one line of JSON (target: split < per-crop).
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_scale import make_images  # noqa: E402

from neurostore.encoders import load_encoder  # noqa: E402
from neurostore.images import ImageFolder  # noqa: E402
from neurostore.models import load_target  # noqa: E402
from neurostore.patches import extract_patches  # noqa: E402
from neurostore.record import Recorder  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0, help="Threads cutting patches.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        make_images(Path(d), args.images)
        t = load_target("torchvision:resnet50@random")
        src = ImageFolder(d)
        hashes = []
        with Recorder(t, ["conv1", "layer1", "layer2", "layer3", "layer4"], k=10, dataset=src.dataset,
                      keep_maps=True) as rec, torch.no_grad():
            for b in src.batches(t.preprocess, 16):
                rec.update(b.image_ids, b.pixels)
                hashes += b.hashes
        res = rec.result()
        enc = load_encoder("open_clip:ViT-B-32/random")

        class PerCrop:  # the encoder's preprocessing crop by crop; no forward
            id, dim, preprocess = "pre", 4, staticmethod(enc.preprocess)

            def encode_images(self, x):
                return torch.zeros(x.shape[0], 4)

        class Split(PerCrop):  # uint8 crops, normalised per batch
            def split_preprocess(self):
                return enc.split_preprocess()

        out, rows = {}, {}
        for name, e in (("per_crop", PerCrop()), ("split", Split())) * 2:
            t0, c0 = time.time(), cpu_s()
            ps = extract_patches(t, res, src, encoders=[e], hashes=hashes, workers=args.workers, progress=False)
            out[name] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu_s() - c0, 1)}  # the second run
            rows[name] = ps.rows
            print(f"{name}: {out[name]}, {len(ps.rows)} patches", file=sys.stderr)
    print(json.dumps({"bench": "patch_cutting", "images": args.images, "workers": args.workers,
                      "patches": len(rows["split"]), "same_patches": rows["split"] == rows["per_crop"],
                      "per_crop": out["per_crop"], "split": out["split"],
                      "cpu_ratio_split_over_per_crop": round(out["split"]["cpu_s"] / out["per_crop"]["cpu_s"], 3),
                      "target": "ratio < 1"}))


if __name__ == "__main__":
    main()
