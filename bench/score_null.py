"""A layer's scores and null in one pass vs the old two: CPU seconds per scorer, one process.

    .venv/bin/python bench/score_null.py [--images 256 --units 512 --concepts 5000]

Before: `run_scorer` (with the within-unit confidence), then `scored_with_null`, whose null
scores soft_wpmi's / wpmi's real units again for p(c). After: `trust.score`, which computes log
p(c | unit) once for both and skips the discarded confidence. Same scores, null and confidence
(checked here). Ends with one line of JSON (target: after < before).
"""

import argparse
import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurostore import scorers as S, trust  # noqa: E402


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--concepts", type=int, default=5000)
    args = ap.parse_args()
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(args.images, 512), dim=-1)   # [n, d]
    txt = torch.nn.functional.normalize(torch.randn(args.concepts, 512), dim=-1)  # [c, d]
    inputs = {"similarity": S.Similarity(img, txt), "pooled": torch.rand(args.images, args.units), "text_emb": txt}
    out = {}
    for s in ["soft_wpmi", "wpmi", "cos_cubed"]:
        p = S.get_scorer(s).prepared(S.resolve_params(s), args.images)
        t = cpu_s()
        old, old_null = trust.scored_with_null(S.run_scorer(s, inputs, p), inputs)
        t1 = cpu_s()
        new, new_null = trust.score(s, inputs, p)
        t2 = cpu_s()
        same = torch.equal(old.scores, new.scores) and torch.equal(old.confidence, new.confidence) and old_null == new_null
        out[s] = {"before_cpu_s": round(t1 - t, 2), "after_cpu_s": round(t2 - t1, 2), "identical": same}
        print(f"{s}: before {t1 - t:.2f} CPU-s, after {t2 - t1:.2f} CPU-s, identical {same}", file=sys.stderr)
    print(json.dumps({"bench": "score_null", "images": args.images, "units": args.units, "concepts": args.concepts,
                      "scorers": out, "target": "after < before, identical"}))


if __name__ == "__main__":
    main()
