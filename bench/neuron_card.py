"""The neuron card on a store (the demo's, by default): seconds to build a card's data (all of it,
and the co-activated units alone, which correlate pooled rows in DuckDB at render time), seconds to
draw one heatmap PNG, and what the stored maps (activations.act_map) cost on disk.

    .venv/bin/neurostore demo --fast --store /tmp/demo-store
    .venv/bin/python bench/neuron_card.py /tmp/demo-store

Per layer, the mean over --units cards (after one warm-up card). Target: a card under 0.3 s.
Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurostore.store import Store  # noqa: E402
from neurostore.web import data as D  # noqa: E402


def map_bytes(store_path: Path) -> dict:
    """Compressed bytes of the act_map column in the store's activations files."""
    rows = col = total = 0
    for f in glob.glob(str(store_path / "tables/activations/**/*.parquet"), recursive=True):
        md = pq.ParquetFile(f).metadata
        rows += md.num_rows
        for g in range(md.num_row_groups):
            for c in range(md.row_group(g).num_columns):
                chunk = md.row_group(g).column(c)
                total += chunk.total_compressed_size
                col += chunk.total_compressed_size if chunk.path_in_schema.startswith("act_map") else 0
    return {"rows": rows, "act_map_bytes": col, "act_map_bytes_per_row": round(col / max(rows, 1), 1),
            "activations_bytes": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--units", type=int, default=10)
    args = ap.parse_args()
    st = Store.open(args.store, read_only=True)
    run = st.sql
    layers = run("SELECT model, layer FROM layers WHERE grid_h * grid_w > 1 ORDER BY model, depth").to_pylist()
    per_layer = {}
    for r in layers:
        m, l = r["model"], r["layer"]
        D.neuron_card(run, m, l, 0)  # warm-up
        t = time.perf_counter()
        for u in range(args.units):
            D.coactivation(run, m, l, [u])
        co = (time.perf_counter() - t) / args.units
        t = time.perf_counter()
        for u in range(args.units):
            card = D.neuron_card(run, m, l, u)
        whole = (time.perf_counter() - t) / args.units
        top = card["patches"][0]
        t = time.perf_counter()
        png = D.heatmap_png(run, top)
        heat = time.perf_counter() - t
        per_layer[f"{m}/{l}"] = {"card_s": round(whole, 3), "coactivation_s": round(co, 3),
                                 "heatmap_s": round(heat, 4), "heatmap_png_bytes": len(png or b"")}
    cards = [v["card_s"] for v in per_layer.values()]
    print(json.dumps({"store": str(args.store), "units_per_layer": args.units, "card_s_max": max(cards),
                      "card_s_mean": round(sum(cards) / len(cards), 3), "target_card_s": 0.3,
                      **map_bytes(args.store), "store_bytes": sum(p.stat().st_size for p in args.store.rglob("*")
                                                                   if p.is_file()),
                      "layers": per_layer}))


if __name__ == "__main__":
    main()
