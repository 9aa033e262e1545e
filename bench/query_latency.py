"""Query latency of the store at scale, against a naive full scan measured in the same run.

Builds a synthetic store through the store's own writer (the writer, not this script, decides
sort order, row groups and the derived tables concept_units and layer_concepts): by default
1,000,000 neurons over 4 models x 8 layers, the top-20 concepts of each (20M score rows), 20,000
concepts. Then times

  (a) concept -> top-50 neurons across all models and layers   (named query concept_neurons)
  (b) neuron -> its concepts                                    (named query neuron_concepts)
  (c) per-layer concept counts                                  (named query layer_concept_counts)

warm (same connection, repeated with different keys) and cold (first query on a fresh DuckDB
connection: no Parquet metadata cache; the OS page cache is not dropped), and the same questions
as plain SQL over one unclustered Parquet file with all rows (shuffled, default row groups).
Machines here are shared, so the ratios matter more than the absolute figures.

Ends by printing one line of JSON.   Usage: python bench/query_latency.py [--neurons 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from neurostore.store import Store  # noqa: E402

TOP_K = 20
TARGET_MS = 20.0


def layer_scores(rng, model: str, layer: str, n_units: int, concept_names: pa.Array) -> pa.Table:
    """Top-20 concepts of each unit of one layer: distinct concepts per unit, scores descending."""
    n_concepts = len(concept_names)
    n = n_units * TOP_K
    base = rng.integers(0, n_concepts, n_units)
    # base + rank*997 (mod 20,000) gives 20 distinct concepts per unit.
    cid = ((base[:, None] + np.arange(TOP_K)[None, :] * 997) % n_concepts).astype(np.int32).ravel()
    score = -np.sort(-rng.random((n_units, TOP_K), dtype=np.float32), axis=1).ravel()
    const = lambda s: pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([s]))  # noqa: E731
    return pa.table({
        "unit": np.repeat(np.arange(n_units, dtype=np.int32), TOP_K),
        "scorer": const("patch"),
        "rank": np.tile(np.arange(TOP_K, dtype=np.int32), n_units),
        "concept": pa.DictionaryArray.from_arrays(pa.array(cid), concept_names),
        "score": score,
        "confidence": score,
        "vocabulary": const("bench"),
        "encoder": const("bench-encoder"),
        "model": const(model),
        "layer": const(layer),
    })


def build(path: Path, n_neurons: int, n_models: int, n_layers: int, n_concepts: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    concept_names = pa.array([f"concept_{i:05d}" for i in range(n_concepts)])
    per_layer = n_neurons // (n_models * n_layers)
    store = Store.open(path)
    t0 = time.perf_counter()
    with tqdm(total=n_models * n_layers, desc="writing layers", file=sys.stderr) as bar:
        for m in range(n_models):
            # One run per model, as a dissect run would be; the store sorts, groups rows and derives
            # concept_units and layer_concepts when the run commits.
            with store.run("bench dissect", {"model": f"model{m}", "seed": seed}) as run:
                for l in range(n_layers):
                    run.write("scores", layer_scores(rng, f"model{m}", f"blocks.{l}.mlp.fc1", per_layer, concept_names))
                    bar.update(1)
    build_s = time.perf_counter() - t0
    counts = store.table_counts()
    store.close()
    return {"build_s": round(build_s, 1), "units_per_layer": per_layer, "score_rows": counts["scores"],
            "concept_units_rows": counts["concept_units"], "layer_concepts_rows": counts["layer_concepts"],
            "store_mb": round(sum(f.stat().st_size for f in (path / "tables").rglob("*.parquet")) / 2**20, 1)}


def write_naive(store_path: Path, out: Path) -> float:
    """All score rows in one Parquet file, shuffled, default row groups: the no-layout baseline."""
    store = Store.open(store_path, read_only=True)
    con = store.connect()
    con.execute(f"SET temp_directory = '{out.parent / 'spill'}'")
    con.execute("SET memory_limit = '3GB'")
    t0 = time.perf_counter()
    con.execute(f"COPY (SELECT * FROM scores ORDER BY hash(model, layer, unit, rank)) TO '{out}' (FORMAT parquet)")
    con.close()
    store.close()
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(xs) * 1000, q)), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--neurons", type=int, default=1_000_000)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--concepts", type=int, default=20_000)
    ap.add_argument("--warm", type=int, default=50, help="warm repetitions per query")
    ap.add_argument("--cold", type=int, default=10, help="cold repetitions per query")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed after)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="neurostore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    store_path, naive = work / "store", work / "naive.parquet"
    try:
        if store_path.exists():
            shutil.rmtree(store_path)
        info = build(store_path, args.neurons, args.models, args.layers, args.concepts, args.seed)
        info["naive_write_s"] = round(write_naive(store_path, naive), 1)
        rng = np.random.default_rng(args.seed + 1)
        per_layer = info["units_per_layer"]

        def keys(n):
            return [{"concept": f"concept_{rng.integers(args.concepts):05d}",
                     "model": f"model{rng.integers(args.models)}",
                     "layer": f"blocks.{rng.integers(args.layers)}.mlp.fc1",
                     "unit": int(rng.integers(per_layer))} for _ in range(n)]

        store_q = {
            "a_concept_top50": lambda s, k: s.query("concept_neurons", {"concept": k["concept"], "top": 50}),
            "b_neuron_concepts": lambda s, k: s.query("neuron_concepts", {"model": k["model"], "layer": k["layer"],
                                                                          "unit": k["unit"]}),
            "c_layer_concept_counts": lambda s, k: s.query("layer_concept_counts", {}),
        }
        nf = f"read_parquet('{naive}')"
        naive_q = {
            "a_concept_top50": (f"SELECT model, layer, unit, score FROM {nf} WHERE concept = $concept "
                                "ORDER BY score DESC LIMIT 50", ("concept",)),
            "b_neuron_concepts": (f"SELECT scorer, rank, concept, score FROM {nf} WHERE model = $model AND "
                                  "layer = $layer AND unit = $unit ORDER BY scorer, rank", ("model", "layer", "unit")),
            "c_layer_concept_counts": (f"SELECT model, layer, scorer, concept, count(*) AS n_units FROM {nf} "
                                       "WHERE rank = 0 GROUP BY ALL", ()),
        }
        results: dict[str, dict] = {}
        checks: dict[str, int] = {}
        for name, fn in store_q.items():
            reps_w = args.warm if not name.startswith("c_") else max(5, args.warm // 5)
            # warm: one store and connection, different keys each time
            s = Store.open(store_path, read_only=True)
            for k in keys(3):
                fn(s, k)
            warm = []
            for k in tqdm(keys(reps_w), desc=f"{name} warm", file=sys.stderr, leave=False):
                t = time.perf_counter()
                r = fn(s, k)
                warm.append(time.perf_counter() - t)
            checks[name] = r.num_rows
            s.close()
            # cold: a fresh connection (views built first, outside the timing) per query
            cold = []
            for k in keys(args.cold):
                s = Store.open(store_path, read_only=True)
                s._connection()
                t = time.perf_counter()
                fn(s, k)
                cold.append(time.perf_counter() - t)
                s.close()
            # naive: same question over the unclustered file, warm connection
            sql, pnames = naive_q[name]
            con = duckdb.connect()
            con.execute("SET parquet_metadata_cache = true")
            reps_n = max(3, reps_w // 5)
            naive_t = []
            for k in [None] + keys(reps_n):
                k = k or keys(1)[0]
                t = time.perf_counter()
                con.sql(sql, params={p: k[p] for p in pnames} or None).to_arrow_table()
                naive_t.append(time.perf_counter() - t)
            con.close()
            naive_t = naive_t[1:]  # first call reads the footer: that is the naive cold case
            results[name] = {
                "warm_p50_ms": pct(warm, 50), "warm_p95_ms": pct(warm, 95),
                "cold_p50_ms": pct(cold, 50), "cold_p95_ms": pct(cold, 95),
                "naive_p50_ms": pct(naive_t, 50),
                "naive_over_store_warm_p50": round(pct(naive_t, 50) / max(pct(warm, 50), 1e-3), 1),
                "rows_returned": checks[name],
            }
        met = all(results[q]["warm_p50_ms"] <= TARGET_MS for q in ("a_concept_top50", "b_neuron_concepts"))
        line = {
            "bench": "query_latency", "neurons": args.neurons, "models": args.models,
            "layers_per_model": args.layers, "concepts": args.concepts, **info,
            "cpus": os.cpu_count(), "duckdb": duckdb.__version__, "queries": results,
            "target": {"a_and_b_warm_p50_ms_max": TARGET_MS, "met": met},
            "units": "ms; build_s and naive_write_s in seconds; ratios = naive p50 / store warm p50",
        }
        print(json.dumps(line))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
