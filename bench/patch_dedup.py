"""Patches embedded vs units x k: how much the dedup saves.

resnet18 (random weights) at 96 px over 64 generated images (smooth random blobs, written to a temp
folder and read back as a user's folder would be), layers layer3, layer4 and fc, k=10. The
encoder here is the count of patches embedded (each unique patch is embedded once per encoder).
Ends with one line of JSON."""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from neurostore.images import ImageFolder  # noqa: E402
from neurostore.models import load_target  # noqa: E402
from neurostore.patches import extract_patches  # noqa: E402
from neurostore.record import record  # noqa: E402

torch.set_num_threads(2)
N, SIZE, K = 64, 96, 10
LAYERS = ["layer3", "layer4", "fc"]

tmp = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
for i in range(N):
    small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((128, 96), Image.Resampling.BICUBIC).save(tmp / f"{i:03d}.png")

torch.manual_seed(0)
target = load_target("torchvision:resnet18@random", input_size=SIZE)
source = ImageFolder(tmp)
res = record(target, LAYERS, source, k=K, batch_size=32, progress=False)
t0 = time.perf_counter()
ps = extract_patches(target, res, source, LAYERS, progress=False)
elapsed = time.perf_counter() - t0
units_k = sum(lr.n_units * K for lr in res.layers.values())
per_layer = {}
for name in LAYERS:
    ids = {ps.assignment[(name, u, r)] for u in range(res.layers[name].n_units) for r in range(K)}
    per_layer[name] = {"units_x_k": res.layers[name].n_units * K, "unique_patches": len(ids)}
n = len(ps.rows)
print(f"{units_k} (unit, image) boxes -> {n} unique patches to embed: ratio {n / units_k:.3f} "
      f"({units_k / n:.1f}x fewer); patch pass {elapsed:.1f} s", file=sys.stderr)
print(json.dumps({"bench": "patch_dedup", "model": "resnet18", "images": N, "k": K, "layers": per_layer,
                  "units_x_k": units_k, "patches_embedded": n, "ratio": round(n / units_k, 4),
                  "savings_x": round(units_k / n, 1), "patch_pass_s": round(elapsed, 1)}))
