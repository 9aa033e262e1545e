"""Peak memory of the CLIP-Dissect scorers: the dense [images x concepts] similarity against the
streamed `scorers.Similarity` (column tiles computed from the embeddings), at N and 4N images.

    .venv/bin/python bench/similarity_memory.py --images 5000 --concepts 20000

Each case runs in a fresh process on random unit-norm embeddings (d = 512) and pooled activations
of --units units: it builds the inputs, notes its peak RSS, scores soft_wpmi and cos_cubed, and
reports the peak RSS the scoring added beyond its inputs. The dense case materialises the
similarity as dissect did before (image_text_similarity); the streamed one is what dissect does
now. Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurostore import scorers as S  # noqa: E402


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, n: int, c: int, u: int) -> dict:
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(n, 512, generator=g), torch.randn(c, 512, generator=g)   # [n, d], [c, d]
    acts = torch.randn(n, u, generator=g)                                            # [n, u]
    inputs_mb = _peak_mb()
    t = time.time()
    sim = S.image_text_similarity(img, txt) if mode == "dense" else S.Similarity(img, txt)
    S.soft_wpmi(sim, acts, top_k=min(100, n))
    S.cos_cubed(sim, acts)
    return {"mode": mode, "images": n, "concepts": c, "seconds": round(time.time() - t, 1),
            "inputs_mb": round(inputs_mb), "peak_mb": round(_peak_mb()),
            "scoring_mb": round(_peak_mb() - inputs_mb)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--concepts", type=int, default=20000)
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(child(args._child[0], int(args._child[1]), args.concepts, args.units)))
        return
    runs = {}
    for mode in ("dense", "streamed"):
        for n in (args.images, 4 * args.images):
            out = subprocess.run([sys.executable, __file__, "--_child", mode, str(n), "--concepts",
                                  str(args.concepts), "--units", str(args.units)], capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(r, file=sys.stderr)
            runs[f"{mode}_{'n' if n == args.images else '4n'}"] = r
    print(json.dumps({"bench": "similarity_memory", "images": args.images, "concepts": args.concepts,
                      "units": args.units, "scoring_mb": {k: r["scoring_mb"] for k, r in runs.items()},
                      "seconds": {k: r["seconds"] for k, r in runs.items()},
                      # dense similarity alone: images x concepts float32
                      "dense_matrix_mb_4n": round(4 * args.images * args.concepts * 4 / 2**20)}))


if __name__ == "__main__":
    main()
