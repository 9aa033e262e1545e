"""`neurostore report`: a static HTML report of a store that works opened from disk.

    from neurostore.report import build_report
    summary = build_report("./neurostore-store", "./neurostore-report")
    # -> {"out": ..., "pages": 212, "images": 1830, "models": 3, "layers": 9, "neurons": 196, ...}

Layout of DIR:
    index.html                          models -> layers
    model/<model>.html                  layers and the concept-by-depth plot
    layer/<model>/<layer>.html          units of a layer, concept-by-depth with this layer marked
    neuron/<model>/<layer>/<unit>.html  neuron cards
    audit.html, compare.html            findings
    patches/<patch_id>.png              every patch image, written once and referenced
    images/<key>.png                    the whole images of the cards' top activations (when their files exist)
    heatmaps/<key>.jpg                  those top images with the unit's activation map over them
    style.css
Pages and images are written through a temporary file and renamed, so a reader never sees half a page.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import BadInput
from .progress import bar as progress_bar
from .web import data as D
from .web.render import PATCH_ID_RE, Links, heatmap_key, render, stylesheet


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def build_report(store, out, models: list[str] | None = None, max_units: int | None = None,
                 top_patches: int = D.TOP_PATCHES, progress: bool = True) -> dict:
    """Write the report of `store` (a Store or a path) into folder `out`. `models` limits it to
    some models; `max_units` to the first units of each layer (all by default)."""
    from .store import Store

    t0 = time.perf_counter()
    st = store if isinstance(store, Store) else Store.open(store, read_only=True)
    out = Path(out).expanduser().resolve()
    if out == st.path or st.path in out.parents:
        raise BadInput(f"Cannot write the report into the store itself ('{out}'). Pick a folder outside it, "
                       "e.g. --out ./neurostore-report.")
    if out.exists() and not out.is_dir():
        raise BadInput(f"'{out}' is a file. Pass --out with a folder path.")
    run = st.sql
    ov = D.overview(run)
    have = [m["model"] for m in ov["models"]]
    if models:
        from .errors import UnknownModel, unknown

        for m in models:
            if m not in have:
                raise UnknownModel(unknown("model", m, have, "See 'neurostore sql \"SELECT * FROM models\"'."))
        ov["models"] = [m for m in ov["models"] if m["model"] in models]
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "style.css", stylesheet())
    pages = 0
    written: set[str] = set()
    written_images: set[str] = set()
    n_layers = n_neurons = n_heatmaps = 0

    def page(rel: str, template: str, data: dict, depth: int) -> None:
        nonlocal pages
        _write(out / rel, render(template, data, Links(static=True, depth=depth), store_path=str(st.path)))
        pages += 1

    # index.html is written last, so a report stopped half-way has none and does not look finished
    (out / "index.html").unlink(missing_ok=True)
    work = [(m, l) for m in ov["models"] for l in m["layers"]]
    bar = progress_bar(len(work), "report", "layer", progress)
    for m in ov["models"]:
        model = m["model"]
        profile = D.depth_profile(run, model)
        page(f"model/{model}.html", "model.html", {"model": m, "profile": profile}, 1)
        for l in m["layers"]:
            layer = l["layer"]
            try:
                lp = D.layer_page(run, model, layer)
            except Exception as e:  # a layer listed without any unit rows
                from .errors import NeurostoreError

                if not isinstance(e, NeurostoreError):
                    raise
                lp = None
            if lp is not None:
                if max_units is not None:
                    lp["units"] = lp["units"][:max_units]
                page(f"layer/{model}/{layer}.html", "layer.html", lp, 2)
                n_layers += 1
                keep = {u["unit"] for u in lp["units"]}
                cards = D.neuron_cards(run, model, layer, top_patches=top_patches)
                cards = {u: c for u, c in cards.items() if u in keep}
                # Images once per patch, however many units share the patch.
                ids = {p["patch_id"] for c in cards.values() for p in c["patches"] if p["has_image"]}
                ids |= {u["top_patch"] for u in lp["units"] if u.get("top_patch")}
                need = sorted(i for i in ids if i not in written and PATCH_ID_RE.match(i))
                if need:
                    for r in run("SELECT patch_id, any_value(thumbnail) AS thumbnail FROM patches "
                                 "WHERE list_contains($ids, patch_id) AND thumbnail IS NOT NULL GROUP BY patch_id",
                                 {"ids": need}).to_pylist():
                        _write(out / "patches" / f"{r['patch_id']}.png", bytes(r["thumbnail"]))
                        written.add(r["patch_id"])
                # Examples across the activation range, when the layer's pooled matrix is small enough.
                n_pooled = run("SELECT count(*) AS n FROM pooled WHERE model = $m AND layer = $l",
                               {"m": model, "l": layer}).column("n")[0].as_py() if "pooled" in st.tables() else 0
                if n_pooled * len(cards) <= D.MAX_QUANTILE_CELLS:
                    for u, q in D.quantile_examples(run, model, layer, sorted(cards)).items():
                        cards[u]["quantiles"] = q
                # Whole images (the cards' "where it fired" and quantile examples), once each, from the
                # files the store names.
                keys = {p["image_key"] for c in cards.values() for p in c["patches"] if p["has_full"]}
                keys |= {i["image_key"] for c in cards.values() for b in c["quantiles"] for i in b["images"]}
                paths = D.image_paths(run, sorted(keys - written_images))  # one query per layer, not per image
                for key in sorted(paths):
                    png = D.image_png(run, key, path=paths[key])
                    if png:
                        _write(out / "images" / f"{key}.png", png)
                        written_images.add(key)
                for p in (p for c in cards.values() for p in c["patches"]):
                    p["has_full"] = p["image_key"] in written_images  # unreadable file: the box alone
                # Each top image with the unit's map over it (a PNG per unit and rank), and the
                # co-activated units of the adjacent layers, under the same pooled-size guard.
                # Each image opened once per layer, whatever number of units it tops.
                paths = D.image_paths(run, sorted({p["image_key"] for c in cards.values() for p in c["patches"]
                                                   if p["has_map"] and p["has_full"]}))
                opened: dict = {}
                for unit, card in cards.items():
                    for p in card["patches"]:
                        key = p["image_key"]
                        if key in paths and key not in opened:
                            opened[key] = D.open_image(run, key, paths[key])
                        jpeg = D.heatmap_jpeg(run, p, opened.get(key))
                        if jpeg:
                            _write(out / "heatmaps" / f"{heatmap_key(model, layer, unit, p['rank'])}.jpg", jpeg)
                            n_heatmaps += 1
                        p["has_map"] = jpeg is not None
                if n_pooled * len(cards) <= D.MAX_QUANTILE_CELLS:
                    for u, links in D.coactivation(run, model, layer, sorted(cards)).items():
                        cards[u]["links"] = links
                for unit, card in cards.items():
                    page(f"neuron/{model}/{layer}/{unit}.html", "neuron.html", card, 3)
                    n_neurons += 1
            bar.update(1)
    bar.close()
    for kind in ("audit", "compare"):
        page(f"{kind}.html", "findings.html", D.findings(run, kind), 0)
    page("index.html", "index.html", ov, 0)
    return {"out": str(out), "index": str(out / "index.html"), "pages": pages, "images": len(written),
            "heatmaps": n_heatmaps,
            "models": len(ov["models"]), "layers": n_layers, "neurons": n_neurons,
            "seconds": round(time.perf_counter() - t0, 2)}
