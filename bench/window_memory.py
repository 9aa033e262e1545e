"""Memory of encoder_iou's window vectors: what a dissect holds for the 28 windows per image it
encodes, from the encoding to the commit, at N and 4N images.

Each case runs in a process of its own and feeds `pipeline._CellCache` random [batch, 28, dim]
float32 windows as the IoU pass does (`add`, then `lookup` of the batch), then makes the rows the
commit writes (`vectors`, then `_embedding_rows` a chunk of EMBEDDING_CHUNK at a time, as
pipeline._commit does; the store write itself is left out, it stages each chunk to a file). The
baseline is the same work as the code before the spill held it: every image's windows in a dict,
concatenated for one write. Peak RSS is measured above the process's RSS before the first batch.

    python bench/window_memory.py --images 20000     # ends with one JSON line
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def case(kind: str, images: int, dim: int, batch: int) -> dict:
    from neurostore import scorers as S
    from neurostore import pipeline as P
    from neurostore.images import CellWindows
    from neurostore.store import Store

    n = S.cell_windows(S.CELL_GRID)
    rng = np.random.default_rng(0)
    block = rng.standard_normal((batch, n, dim)).astype(np.float32)   # reused: the values do not matter
    t0, base = time.time(), peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        cache = P._CellCache(Store.open(Path(tmp) / "s"), "enc", CellWindows(None, S.CELL_GRID, None))
        held: dict[str, np.ndarray] = {}
        for at in range(0, images, batch):
            hs = [f"{at + i:08d}" for i in range(min(batch, images - at))]
            emb = block[:len(hs)] + np.float32(at)                      # a fresh array per batch, as the encoder gives
            if kind == "spill":
                cache.add(hs, emb)
                cache.lookup(hs)
            else:
                held.update(zip(hs, emb))
                np.stack([held[h] for h in hs])
        rows = 0
        if kind == "spill":
            ids, m = cache.vectors()
            for at in range(0, len(ids), P.EMBEDDING_CHUNK):
                rows += P._embedding_rows("enc", "cell", ids[at:at + P.EMBEDDING_CHUNK],
                                          np.asarray(m[at:at + P.EMBEDDING_CHUNK])).num_rows
        else:
            ids = [f"{h}/{i}" for h in held for i in range(n)]
            rows = P._embedding_rows("enc", "cell", ids, np.concatenate(list(held.values()))).num_rows
    return {"case": kind, "images": images, "rows": rows, "peak_mb_above_start": round(peak_mb() - base, 1),
            "seconds": round(time.time() - t0, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000, help="N; each case also runs at 4N")
    ap.add_argument("--dim", type=int, default=512, help="encoder width (ViT-B-32: 512)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.case:
        print(json.dumps(case(a.case, a.images, a.dim, a.batch)))
        return
    out = {}
    for kind in ("held", "spill"):
        for n in (a.images, 4 * a.images):
            r = subprocess.run([sys.executable, __file__, "--case", kind, "--images", str(n), "--dim", str(a.dim),
                                "--batch", str(a.batch)], capture_output=True, text=True, check=True)
            out[f"{kind}@{n}"] = json.loads(r.stdout)
            print(out[f"{kind}@{n}"], file=sys.stderr)
    N, M = a.images, 4 * a.images
    # growth of the peak per image beyond N: what the dissect keeps per image while the windows
    # are on their way to the store (the spill: its hash and place; held: 28 x dim floats, twice
    # at the commit, the dict's and the one array's)
    per = {k: round((out[f"{k}@{M}"]["peak_mb_above_start"] - out[f"{k}@{N}"]["peak_mb_above_start"])
                    * 2 ** 20 / (M - N)) for k in ("held", "spill")}
    print(json.dumps({"bench": "window_memory", "images": [N, M], "dim": a.dim, "cases": out,
                      "peak_bytes_per_image": per,
                      "held_over_spill_peak_at_4n": round(out[f"held@{M}"]["peak_mb_above_start"]
                                                          / out[f"spill@{M}"]["peak_mb_above_start"], 1),
                      "units": {"peak_mb_above_start": "MB above the process's RSS before the first batch",
                                "peak_bytes_per_image": "bytes of peak RSS per image beyond N"},
                      "targets": {"peak_bytes_per_image": "spill <= 1024 (an image's bookkeeping, not its windows)"},
                      "meets": per["spill"] <= 1024}))

if __name__ == "__main__":
    main()
