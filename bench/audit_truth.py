"""`neurostore audit` on a probe-world store, timed and scored against the world's truth.

Audits every model of STORE (writing the audit, as the command does; run it on a copy), then per
model: the headline (class, concept) against the planted (cue class, cue kind), whether it was
verified and how (units, units+tokens, or a residual direction), the cue flip rate before and
after, and the flagged units scored against the `iou` reference: a cue unit is one whose top
`iou` concept is the cue (IoU >= 0.04); the figure to keep low is the fraction of the audited
non-cue units that were flagged. Wall and CPU seconds of the audit alone, and the load average.

Ends by printing one line of JSON.   Usage: python bench/audit_truth.py STORE [--max-images 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

from neurostore.analysis import audit
from neurostore.analysis._common import load_model, open_store


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("store")
    ap.add_argument("--max-images", type=int, default=2000)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_SELF)
    res = audit(args.store, progress=False, max_images=args.max_images)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"store": args.store, "wall_s": round(time.time() - t0, 1),
           "cpu_s": round(c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime, 1),
           "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)], "models": {}}
    st = open_store(args.store)
    units = res.units.to_pylist()
    for h in res.headlines:
        m = h["model"]
        cfg = load_model(st, m).extra["world"].config
        ref = {(r["layer"], r["unit"]): r["concept"] for r in st.sql(
            "SELECT layer, unit, concept FROM scores WHERE model = $m AND scorer = 'iou' AND rank = 0 AND score >= 0.04",
            {"m": m}).to_pylist()}
        rows = [u for u in units if u["model"] == m]
        non = [u for u in rows if ref.get((u["layer"], u["unit"])) != cfg.cue_kind]
        out["models"][m] = {
            "planted": [cfg.cue_class, cfg.cue_kind], "headline": [h["class"], h["concept"]],
            "verified": h["verified"], "ablation": h["ablation"], "direction_layer": h["direction_layer"],
            "cue_flip": [h["cue_flip_before"], h["cue_flip_after"]],
            "rows": len(rows), "flagged": sum(u["flagged"] for u in rows),
            "cue_units_flagged": sum(u["flagged"] for u in rows if u not in non),
            "noncue_flagged_frac": round(sum(u["flagged"] for u in non) / max(1, len(non)), 3),
            "findings": [[f["class"], f["concept"], f["ablation"], f["verified"]] for f in res.findings.to_pylist()
                         if f["model"] == m and f["verified"] is not None]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
