"""A small but realistic store for the report / web / guard / browser tests, written through the
Store API: two models, five layers, scores from two scorers, explanations (some with summaries),
top-k activations whose patch_ids point at real PNG thumbnails drawn with PIL, unit statistics
with histograms, concept vectors (real MiniLM) and a few effects."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from neurostore.sqlfuncs import embed_concepts

DATASET = "probe-test"
SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
TEXTURES = ["striped", "dotted", "plain"]
CATEGORY = {**{s: "shape" for s in SHAPES}, **{c: "colour" for c in COLOURS}, **{t: "texture" for t in TEXTURES}}
LAYERS = {
    "toy-cnn": [("conv1", "conv", 6), ("layer1.0.conv2", "conv", 6), ("fc", "linear", 4)],
    "toy-vit": [("blocks.0.mlp.fc1", "vit_mlp", 5), ("blocks.1.mlp.fc1", "vit_mlp", 5)],
}
TOP_K = 6
N_IMAGES = 24


def draw(shape: str, colour: str, texture: str, size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), (235, 235, 225))
    d = ImageDraw.Draw(im)
    c = COLOURS[colour]
    box = (10, 10, size - 10, size - 10)
    if shape == "circle":
        d.ellipse(box, fill=c)
    elif shape == "square":
        d.rectangle(box, fill=c)
    elif shape == "triangle":
        d.polygon([(size // 2, 8), (8, size - 8), (size - 8, size - 8)], fill=c)
    else:
        pts = []
        for i in range(10):
            r = (size // 2 - 6) if i % 2 == 0 else (size // 5)
            a = np.pi / 2 + i * np.pi / 5
            pts.append((size / 2 + r * np.cos(a), size / 2 - r * np.sin(a)))
        d.polygon(pts, fill=c)
    if texture == "striped":
        for x in range(0, size, 8):
            d.line([(x, 0), (x, size)], fill=(250, 250, 250), width=2)
    elif texture == "dotted":
        for x in range(4, size, 10):
            for y in range(4, size, 10):
                d.ellipse((x, y, x + 3, y + 3), fill=(20, 20, 20))
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def images() -> list[dict]:
    out = []
    for i in range(N_IMAGES):
        shape = SHAPES[i % 4]
        colour = list(COLOURS)[(i // 4) % 3]
        texture = TEXTURES[(i // 2) % 3]
        out.append({"dataset": DATASET, "image_id": f"{i:04d}", "path": f"/nonexistent/{i:04d}.png", "width": 64,
                    "height": 64, "label": shape, "caption": f"a {colour} {texture} {shape}", "split": "test",
                    "has_cue": i % 5 == 0, "shape": shape, "colour": colour, "texture": texture})
    return out


def build(store) -> dict:
    """Write the fixture into `store`; returns what the tests need to know."""
    rng = np.random.default_rng(0)
    imgs = images()
    patches, patch_of = [], {}
    for im in imgs:
        pid = hashlib.sha1(f"{DATASET}/{im['image_id']}/0,0,64,64".encode()).hexdigest()[:16]
        patch_of[im["image_id"]] = pid
        patches.append({"patch_id": pid, "dataset": DATASET, "image_id": im["image_id"], "x0": 0, "y0": 0,
                        "x1": 64, "y1": 64, "thumbnail": png(draw(im["shape"], im["colour"], im["texture"]))})
    models, layers, units, acts, scores, expl, effects, pooled = [], [], [], [], [], [], [], []
    # A conv unit's map on its top images (schema/activations.sql act_map): a blob peaking at the
    # max cell (row 3, column 4) of the 8x8 grid.
    yy, xx = np.mgrid[0:8, 0:8]
    peak = np.round(100 * np.exp(-((yy - 3) ** 2 + (xx - 4) ** 2) / 4.0)).astype(int).tolist()
    truth = {}
    for model, ls in LAYERS.items():
        models.append({"model": model, "spec": f"probe:{model.split('-')[1]}", "arch": model.upper(),
                       "n_params": 12345 + len(model), "input_size": 64, "classes": SHAPES, "crop_fraction": None})
        for depth, (layer, kind, n) in enumerate(ls):
            layers.append({"model": model, "layer": layer, "kind": kind, "n_units": n, "grid_h": 8 if kind == "conv" else 1,
                           "grid_w": 8 if kind == "conv" else 1, "depth": depth,
                           "depth_frac": depth / (len(ls) - 1)})
            # Per-image maxima (the co-activation links): unit u of every layer follows one shared
            # signal with weight (-1)^u, so adjacent layers' units correlate with signs to check.
            prng = np.random.default_rng(depth)  # its own generator: the other draws stay as they were
            signal = np.random.default_rng(len(model)).normal(size=N_IMAGES)  # one per model
            for im_i, im in enumerate(imgs):
                acts_i = [float(((-1) ** u) * signal[im_i] * (u + 1) + 0.1 * prng.normal()) for u in range(n)]
                pooled.append({"model": model, "layer": layer, "dataset": DATASET, "image_id": im["image_id"],
                               "act_mean": acts_i, "act_max": acts_i})
            for unit in range(n):
                # Early layers detect colours and textures, late layers shapes (what the depth plot shows).
                frac = depth / (len(ls) - 1)
                if frac < 0.3:
                    key, concept = "colour", list(COLOURS)[unit % 3]
                elif frac < 0.7:
                    key, concept = "texture", TEXTURES[unit % 3]
                else:
                    key, concept = "shape", SHAPES[unit % 4]
                truth[(model, layer, unit)] = concept
                matching = [im for im in imgs if im[key] == concept]
                others = [im for im in imgs if im[key] != concept]
                ranked = matching + others
                vals = np.sort(rng.gamma(2.0, 1.0, N_IMAGES))[::-1] * (1 + unit)
                for r, im in enumerate(ranked[:TOP_K]):
                    acts.append({"model": model, "layer": layer, "unit": unit, "rank": r, "dataset": DATASET,
                                 "image_id": im["image_id"], "act_value": float(vals[r]),
                                 "act_mean": float(vals[r] / 3), "loc_y": 3, "loc_x": 4,
                                 "act_map": peak if kind == "conv" else None,
                                 "patch_id": patch_of[im["image_id"]]})
                counts, edges = np.histogram(vals, bins=12)
                units.append({"model": model, "layer": layer, "unit": unit, "dataset": DATASET, "n_images": N_IMAGES,
                              "act_mean": float(vals.mean()), "act_std": float(vals.std()), "act_max": float(vals.max()),
                              "frac_active": 0.75, "q50": float(np.quantile(vals, 0.5)),
                              "q90": float(np.quantile(vals, 0.9)), "q99": float(np.quantile(vals, 0.99)),
                              "hist_edges": edges.astype(np.float32).tolist(), "hist_counts": counts.tolist()})
                for scorer in ("patch", "iou"):
                    others_c = [c for c in CATEGORY if c != concept]
                    rng.shuffle(others_c)
                    ranked_c = [concept] + others_c[:4]
                    for r, c in enumerate(ranked_c):
                        scores.append({"model": model, "layer": layer, "unit": unit, "scorer": scorer, "rank": r,
                                       "concept": c, "score": float(0.3 - 0.05 * r + 0.01 * unit),
                                       "confidence": float(0.95 - 0.15 * r), "vocabulary": "probe",
                                       "encoder": None if scorer == "iou" else "probe:test"})
                    expl.append({"model": model, "layer": layer, "unit": unit, "scorer": scorer, "label": concept,
                                 "confidence": 0.95, "concepts": ranked_c, "confidences": [0.95 - 0.15 * r for r in range(5)],
                                 "summary": (f"Fires on {concept} things, wherever they appear." if scorer == "patch"
                                             and unit % 2 == 0 else None),
                                 "summary_by": "claude-test" if scorer == "patch" and unit % 2 == 0 else None,
                                 "vocabulary": "probe", "encoder": None if scorer == "iou" else "probe:test"})
                if layer == "fc":
                    for cls in SHAPES:
                        effects.append({"model": model, "layer": layer, "unit": unit, "units": None, "class": cls,
                                        "kind": "ablation", "value": -0.3 if cls == concept else -0.01,
                                        "baseline": 0.9, "ablated": 0.6 if cls == concept else 0.89,
                                        "n_images": 50, "dataset": DATASET})
    concepts = [{"vocabulary": "probe", "concept": c, "category": cat} for c, cat in CATEGORY.items()]
    with store.run("test fixture", {"fixture": "web"}) as run:
        run.write("images", pa.Table.from_pylist([{**{k: v for k, v in im.items() if k not in ("shape", "colour", "texture")},
                                                   "content_hash": None} for im in imgs]))
        run.write("patches", pa.Table.from_pylist(patches))
        run.write("models", pa.Table.from_pylist(models))
        run.write("layers", pa.Table.from_pylist(layers))
        run.write("units", pa.Table.from_pylist(units))
        run.write("activations", pa.Table.from_pylist(acts))
        run.write("pooled", pa.Table.from_pylist(pooled))
        run.write("scores", pa.Table.from_pylist(scores))
        run.write("explanations", pa.Table.from_pylist(expl))
        run.write("effects", pa.Table.from_pylist(effects))
        run.write("concepts", pa.Table.from_pylist(concepts))
        run.write("vocabularies", pa.Table.from_pylist([{"vocabulary": "probe", "source": "builtin",
                                                          "description": "probe world", "n_concepts": len(concepts)}]))
    embed_concepts(store, "probe")  # real MiniLM vectors: semantic search and similar_concepts()
    n_units = sum(n for ls in LAYERS.values() for _, _, n in ls)
    return {"n_units": n_units, "n_layers": sum(len(ls) for ls in LAYERS.values()), "n_patches": len(patches),
            "truth": truth, "patch_ids": [p["patch_id"] for p in patches]}


_built: dict = {}


def shared_store(tmp_path_factory):
    """The fixture store, built once per test process and shared by every test module."""
    if "store" not in _built:
        from neurostore.store import Store

        path = tmp_path_factory.mktemp("webstore") / "store"
        store = Store.open(path)
        info = build(store)
        store.close()
        _built["store"] = (path, info)
    return _built["store"]


def shared_server(tmp_path_factory, timeout: float = 2.0):
    """One web server (any free port, background thread) over the shared store."""
    if "server" not in _built:
        import threading

        from neurostore.web import make_server

        path, info = shared_store(tmp_path_factory)
        server = make_server(path, port=0, quiet=True, timeout=timeout)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _built["server"] = server
    return _built["server"]
