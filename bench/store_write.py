"""The store stage of a large dissect: its commit of the recorder's tables, this code against an
earlier revision's, each in a process of its own on the same synthetic recording.

The recording has a dissect's shape: --images N probe images (default 10,000) through the five
layers of resnet50 that CLIP-Dissect dissects (conv1, layer1..layer4: 64, 256, 512, 1,024 and
2,048 units, 224-px grids 112..7), random float16 pooled activations (as the recorder keeps them),
top-10 images per unit with their grid maps, per-unit statistics. Each side runs the calls
pipeline._commit makes for them, in its order: RecordResult.activations_table() (without the patch
ids a dissect fills in), units_table(), pooled_table(), each written into one Store.run, then the
commit; it times each piece (wall and CPU seconds, every thread's), then reads
back one layer's pooled rows through DuckDB (the read side must not get slower) and digests every
table it wrote, read back through DuckDB, so the two sides are shown to store the same values.

The baseline is the code at --baseline REV (git archive of neurostore/, schema/, queries/; default:
the revision before the store-stage change); with no git checkout only this code runs. Pooled
pieces scale with the images, the rest with the units: the 50,000-image figure is extrapolated so.

    python bench/store_write.py --images 10000          # ends with one JSON line
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = "ada6398"   # the commit before the store stage was made cheaper
LAYERS = {"conv1": (64, 112), "layer1": (256, 56), "layer2": (512, 28), "layer3": (1024, 14), "layer4": (2048, 7)}
K = 10
FULL = 50_000
H200_STORE_S = 27.2   # the store stage of the 50,000-image H200 dissect at 0f4f7c2 (README)


def recording(n: int, seed: int = 0):
    """A RecordResult of a dissect's shape with random values (the same for a seed)."""
    import numpy as np

    from neurostore.record import N_HIST_BINS, LayerResult, RecordResult

    rng = np.random.default_rng(seed)
    layers = {}
    for name, (u, g) in LAYERS.items():
        mean = np.abs(rng.standard_normal((n, u), dtype=np.float32))               # [n, units]
        mx = (mean * rng.uniform(1, 4, (n, u)).astype(np.float32))                 # [n, units]
        mx[:, rng.random(u) < 0.2] = 0.0    # units that never fire: post-ReLU zeros
        top_idx = np.stack([rng.choice(n, K, replace=False) for _ in range(u)])   # [units, k]
        top_val = -np.sort(-rng.random((u, K), dtype=np.float32) * 5, axis=1)      # [units, k]
        edges = np.sort(rng.random((u, N_HIST_BINS + 1)), axis=1)                   # [units, bins+1]
        stats = {c: rng.random(u) for c in ("act_mean", "act_std", "act_max", "frac_active", "q50", "q90", "q99")}
        stats |= {"hist_edges": edges, "hist_counts": rng.integers(0, 100, (u, N_HIST_BINS))}
        layers[name] = LayerResult(
            name, u, g, g, top_idx, top_val, top_val / 2, rng.integers(0, g, (u, K)).astype(np.int32),
            rng.integers(0, g, (u, K)).astype(np.int32), mean.astype(np.float16), mx.astype(np.float16), stats,
            rng.random((u, K, g, g), dtype=np.float32))                            # [units, k, h, w]
    ids = [f"images/{i:06d}.jpg" for i in range(n)]
    return RecordResult("resnet50", "photos-0b1e2c3d", ids, layers, [])


def digest(store, table: str) -> str:
    """sha256 of a table's rows as DuckDB reads them back (run_id aside), in key order: equal
    digests are equal values, float bits included."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = {"pooled": "model, layer, image_id", "units": "model, layer, unit", "activations": "model, layer, unit, rank"}
    t = store.sql(f"SELECT * EXCLUDE (run_id) FROM {table} ORDER BY {keys[table]}")
    h = hashlib.sha256()
    for name in t.column_names:
        col = t.column(name).combine_chunks()
        while pa.types.is_list(col.type):
            h.update(col.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False).tobytes())
            col = pc.list_flatten(col)
        if pa.types.is_string(col.type):
            h.update("\x00".join(map(str, col.to_pylist())).encode())
        else:
            h.update(np.ascontiguousarray(col.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())
        h.update(col.is_null().to_numpy(zero_copy_only=False).tobytes())
    return h.hexdigest()


def worker(n: int, folder: Path) -> dict:
    """One side: the commit's calls on the recording, timed piece by piece (runs in the code
    whose neurostore is first on sys.path)."""
    import torch

    from neurostore.store import Store

    torch.set_num_threads(os.cpu_count() or 1)
    rec = recording(n)
    store = Store.open(folder)
    out, cpu, key = {}, {}, f"record:{rec.dataset}"

    def lap(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn()
        out[name] = round(time.perf_counter() - t0, 3)
        cpu[name] = round(time.process_time() - c0, 3)   # every thread's: the work to spread over cores
        return r

    t0 = time.perf_counter()
    with store.run("dissect", {"bench": "store_write", "images": n}) as run:
        acts = lap("activations_table", rec.activations_table)
        lap("activations_write", lambda: run.write("activations", acts, key=key))
        units = lap("units_table", rec.units_table)
        lap("units_write", lambda: run.write("units", units, key=key))
        pooled = lap("pooled_table", rec.pooled_table)
        lap("pooled_write", lambda: run.write("pooled", pooled, key=key))
        acts = units = pooled = None   # as in _commit, nothing but the run holds them now
        t_commit, c_commit = time.perf_counter(), time.process_time()
    out["commit"] = round(time.perf_counter() - t_commit, 3)
    cpu["commit"] = round(time.process_time() - c_commit, 3)
    out["total"] = round(time.perf_counter() - t0, 3)
    out["cpu"] = cpu
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024   # recording + commit
    out["pooled_bytes"] = sum(e["bytes"] for e in store.manifest()["tables"]["pooled"])
    reads = []
    for _ in range(5):   # one layer's pooled rows, as trust and compare read them; a fresh connection each
        with Store.open(folder, read_only=True) as st:
            t1 = time.perf_counter()
            st.sql("SELECT image_id, act_mean, act_max FROM pooled WHERE model = $m AND layer = $l",
                   {"m": "resnet50", "l": "layer4"})
            reads.append(time.perf_counter() - t1)
    out["read_layer4_s"] = round(min(reads), 3)
    out["digests"] = {t: digest(store, t) for t in ("pooled", "units", "activations")}
    return out


def side(root: Path, n: int, tmp: Path) -> dict:
    folder = Path(tempfile.mkdtemp(dir=tmp)) / "store"
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, __file__, "--images", str(n), "--worker", str(folder)], env=env,
                          cwd=root, capture_output=True, text=True)
    shutil.rmtree(folder.parent, ignore_errors=True)
    if proc.returncode:
        sys.exit(f"the side at {root} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCALING = ("pooled_table", "pooled_write", "commit")   # grow with the images; the rest with the units


def at_full(r: dict, n: int) -> float:
    return sum(r[k] * (FULL / n if k in SCALING else 1) for k in SCALING + (
        "activations_table", "activations_write", "units_table", "units_write"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--baseline", default=BASELINE, help="git revision to compare with ('' = none)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the fastest counts")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.images, Path(a.worker))))
        return
    tmp = Path(tempfile.mkdtemp(prefix="store_write-"))
    try:
        base = None
        if a.baseline and (REPO / ".git").exists():
            base = tmp / "baseline"
            base.mkdir()
            arch = subprocess.run(["git", "-C", str(REPO), "archive", a.baseline, "neurostore", "schema", "queries"],
                                  capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(base)], input=arch, check=True)
        runs = {"new": [], "old": []}
        for _ in range(a.repeats):
            runs["new"].append(side(REPO, a.images, tmp))
            if base is not None:
                runs["old"].append(side(base, a.images, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {s: min(r, key=lambda x: x["total"]) for s, r in runs.items() if r}
    pieces = [k for k in best["new"] if isinstance(best["new"][k], float) and k not in ("total", "read_layer4_s")]
    print(f"{a.images:,} images x {sum(u for u, _ in LAYERS.values()):,} units, best of {a.repeats}, "
          f"{os.cpu_count()} cores; seconds:", file=sys.stderr)
    for k in pieces + ["total"]:
        print(f"  {k:18s} " + "  ".join(f"{s} {best[s][k]:7.3f}" + (f" (cpu {best[s]['cpu'][k]:6.3f})" if k in best[s]["cpu"]
                                                                   else "") for s in best), file=sys.stderr)
    res = {"bench": "store_write", "images": a.images, "units": sum(u for u, _ in LAYERS.values()),
           "cores": os.cpu_count(), "new_s": best["new"]["total"], "new_pieces_s": {k: best["new"][k] for k in pieces},
           "new_pieces_cpu_s": best["new"]["cpu"],
           "new_at_50k_s": round(at_full(best["new"], a.images), 1), "pooled_mb": round(best["new"]["pooled_bytes"] / 1e6, 1),
           "read_layer4_s": best["new"]["read_layer4_s"], "peak_rss_mb": best["new"]["peak_rss_mb"], "units_of_time": "seconds",
           "target": f"faster than the baseline (the H200's store stage: {H200_STORE_S} s at 50,000 images), "
                     "the same values read back, a layer's pooled read no more than 10% slower"}
    if "old" in best:
        old = best["old"]
        same = old["digests"] == best["new"]["digests"]
        res |= {"baseline": a.baseline, "old_s": old["total"], "old_pieces_s": {k: old[k] for k in pieces},
                "old_pieces_cpu_s": old["cpu"],
                "old_at_50k_s": round(at_full(old, a.images), 1), "old_pooled_mb": round(old["pooled_bytes"] / 1e6, 1),
                "old_read_layer4_s": old["read_layer4_s"], "old_peak_rss_mb": old["peak_rss_mb"], "speedup": round(old["total"] / best["new"]["total"], 2),
                "same_values": same, "cpu_s": round(sum(best["new"]["cpu"].values()), 2),
                "old_cpu_s": round(sum(old["cpu"].values()), 2),
                "pass": same and best["new"]["total"] < old["total"]
                and best["new"]["read_layer4_s"] <= 1.1 * old["read_layer4_s"]}
        print(f"old/new {res['speedup']}x; at 50,000 images ~{res['old_at_50k_s']} s -> ~{res['new_at_50k_s']} s here; "
              f"layer4 read {old['read_layer4_s']} -> {best['new']['read_layer4_s']} s; "
              f"pooled {res['old_pooled_mb']} -> {res['pooled_mb']} MB; peak RSS {old['peak_rss_mb']} -> "
              f"{best['new']['peak_rss_mb']} MB; same values read back: {same}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
