"""Recording vs a plain forward pass over the same images, interleaved in one run.

resnet18 (random weights), 4 hooked layers, 512 images at 96 px, batch 64. Prints the ratio
recording time / forward time (target <= 1.15) and ends with one line of JSON."""

import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from neurostore.models import load_target  # noqa: E402
from neurostore.record import Recorder  # noqa: E402

torch.set_num_threads(2)
N, SIZE, BS, REPEATS = 512, 96, 64, 3
LAYERS = ["layer1", "layer2", "layer3", "layer4"]

torch.manual_seed(0)
target = load_target("torchvision:resnet18@random", input_size=SIZE)
images = torch.randn(N, 3, SIZE, SIZE)  # [n, 3, S, S]
ids = [f"img{i}" for i in range(N)]


@torch.no_grad()
def plain():
    for i in range(0, N, BS):
        target.module(images[i : i + BS])


def recording():
    with Recorder(target, LAYERS, k=10, dataset="bench") as rec:
        for i in range(0, N, BS):
            rec.update(ids[i : i + BS], images[i : i + BS])
    return rec.result()


plain(), recording()  # warm-up (allocator, lazy inits, list_layers cache)
t_plain, t_rec = [], []
for _ in range(REPEATS):  # interleaved so that load on the machine hits both alike
    t0 = time.perf_counter(); plain(); t_plain.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); recording(); t_rec.append(time.perf_counter() - t0)
fp, rc = min(t_plain), min(t_rec)
ratio = rc / fp
print(f"plain forward {fp:.2f} s, recording {rc:.2f} s over {N} images: ratio {ratio:.3f} (target <= 1.15)",
      file=sys.stderr)
print(json.dumps({"bench": "record_overhead", "model": "resnet18", "layers": LAYERS, "images": N,
                  "image_px": SIZE, "batch": BS, "forward_s": round(fp, 3), "record_s": round(rc, 3),
                  "ratio": round(ratio, 3), "target_ratio": 1.15, "pass": ratio <= 1.15}))
