"""Peak memory while recording 100k images, generated on the fly (never written to disk) and
streamed through the same recorder API (`record_batches`). A small CNN at 32 px keeps it to
minutes on two cores; what is measured is that memory does not grow with the probe set beyond
the outputs that must (pooled float16 rows and image ids). Target: peak RSS < 2 GB.
Ends with one line of JSON."""

import json
import resource
import sys
import time

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/bench/", 1)[0])
from neurostore.models import Target  # noqa: E402
from neurostore.record import record_batches  # noqa: E402

torch.set_num_threads(2)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
SIZE, BS = 32, 250


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                    nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                    nn.Linear(64, 10)).eval()
target = Target(net, "bench-cnn", "bench", None, None, SIZE)
LAYERS = ["1", "3", "5", "8"]
samples = []


def batches():
    g = torch.Generator().manual_seed(0)
    for start in range(0, N, BS):
        n = min(BS, N - start)
        if start % 10_000 == 0:
            samples.append((start, rss_mb()))
        yield [f"gen/{i:06d}" for i in range(start, start + n)], torch.rand(n, 3, SIZE, SIZE, generator=g)


rss0 = rss_mb()
t0 = time.perf_counter()
res = record_batches(target, LAYERS, batches(), dataset="generated", k=10)
elapsed = time.perf_counter() - t0
assert res.n_images == N
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
pooled_mb = sum(lr.pooled_max.nbytes + lr.pooled_mean.nbytes for lr in res.layers.values()) / 2**20
print(f"{N} images in {elapsed:.0f} s; RSS start {rss0:.0f} MB, peak {peak_mb:.0f} MB "
      f"(pooled outputs {pooled_mb:.0f} MB); RSS every 10k: {[round(m) for _, m in samples]}", file=sys.stderr)
print(json.dumps({"bench": "record_memory", "images": N, "image_px": SIZE, "batch": BS,
                  "layers": LAYERS, "units": sum(lr.n_units for lr in res.layers.values()),
                  "seconds": round(elapsed, 1), "rss_start_mb": round(rss0), "peak_rss_mb": round(peak_mb),
                  "pooled_output_mb": round(pooled_mb, 1),
                  "rss_mb_every_10k": [round(m) for _, m in samples],
                  "target_peak_rss_mb": 2048, "pass": peak_mb < 2048}))
