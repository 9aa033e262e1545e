"""The dissection pipeline: record -> patches -> vocabulary -> scores -> explanations -> store.

Each stage is a plain function of its own module; this one only composes them, in one direction,
and hands every table to the Store in one run, so a crash leaves nothing half-written.

Write keys (what a re-run replaces): every table that belongs to a model is partitioned by
model (and layer), and each write carries the key of the work that produced it, so re-running
the same work replaces its rows and different work sits beside it:

    models                          model:<model>
    layers, activations, units,     record:<dataset>            (per model/layer partition)
      pooled
    images, masks, rejects          images:<dataset>
    patches, patch embeddings       patches:<model>:<dataset>[:<encoder>]
    image embeddings                image-emb:<dataset>:<encoder>
    vocabularies, concepts,         vocab:<vocabulary>[:<encoder>]
      concept embeddings
    scores, explanations            score:<dataset>:<scorer>:<vocabulary>:<encoder>
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import scorers as S
from .errors import BadInput, BadParameter
from .explain import explanations_table, summarise
from .images import ImageFolder, ImageSource
from .models import Target, layers_table_rows, list_layers, load_target, resolve_layer
from .patches import extract_patches
from .record import activation_maps, record
from .store import Store
from .vocab import Vocabulary, concepts_table, load_vocabulary, vocabulary_table

ALL_SCORERS = ("patch", "soft_wpmi", "wpmi", "cos_cubed", "iou")
DEFAULT_ENCODER_ONLINE = "open_clip:ViT-B-32/laion2b_s34b_b79k"
UNIT_KINDS = ("conv", "vit_mlp", "linear", "logits")


def _is_unit_layer(kind: str, layer: str) -> bool:
    """Layers whose units are neurons in the papers' sense: conv channels, linear neurons, and in
    a transformer MLP the hidden neurons (its first linear layer), not its norms or dropouts."""
    if kind == "vit_mlp":
        return layer.rsplit(".", 1)[-1] in ("fc1", "c_fc", "lin1")
    return kind in UNIT_KINDS


def default_layers(target: Target, most: int = 6) -> list[str]:
    """Up to `most` layers spread over the depth of the model (always the last, whose units are
    the classes), among conv channels, linear neurons and ViT MLP hidden neurons (a ViT's
    neurons: its conv patch stem is left out)."""
    infos = [li for li in list_layers(target) if _is_unit_layer(li.kind, li.layer)]
    if any(li.kind == "vit_mlp" for li in infos):
        # In a transformer the conv layers are the patch stem: its neurons are the MLP's.
        infos = [li for li in infos if li.kind != "conv"]
    names = [li.layer for li in infos]
    if len(names) <= most:
        return names
    pick = np.linspace(0, len(names) - 1, most).round().astype(int)
    return [names[i] for i in sorted(set(pick))]


def _vector_column(m: np.ndarray) -> pa.Array:
    m = np.ascontiguousarray(m, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(m.ravel(), pa.float32()), m.shape[1])


def _embedding_rows(encoder_id: str, kind: str, ids: Sequence[str], m: np.ndarray) -> pa.Table:
    return pa.table({"encoder": pa.array([encoder_id] * len(ids), pa.string()),
                     "kind": pa.array([kind] * len(ids), pa.string()),
                     "item_id": pa.array(list(ids), pa.string()),
                     "vector": _vector_column(m) if len(ids) else pa.array([], pa.list_(pa.float32()))})


def _with(table: pa.Table, **cols) -> pa.Table:
    for name, value in cols.items():
        table = table.append_column(name, pa.array([value] * table.num_rows, pa.string()))
    return table


# ---- inputs -----------------------------------------------------------------------------------


def resolve_vocabulary(spec: str, store: Store, world=None, **llm) -> Vocabulary:
    """A vocabulary by spec. LLM vocabularies are cached in the store: the same model, domain
    and size are read back from the concepts table instead of asking the LLM again."""
    if spec.startswith("llm:"):
        from .vocab import llm_cache_key
        from .llm import default_model

        domain = spec[4:].strip()
        n = int(llm.get("n", 200))
        model = llm.get("model") or default_model()
        key = llm_cache_key(model, domain, n)
        names = store.sql("SELECT vocabulary, source, description FROM vocabularies "
                          "WHERE vocabulary LIKE $p", {"p": f"llm:%{key}%"}).to_pylist()
        if names:
            v = names[0]
            rows = store.sql("SELECT concept, category FROM concepts WHERE vocabulary = $v ORDER BY concept",
                             {"v": v["vocabulary"]}).to_pylist()
            if rows:
                return Vocabulary(name=v["vocabulary"], source=v["source"], description=v["description"],
                                  concepts=[r["concept"] for r in rows],
                                  categories=[r["category"] for r in rows])
        return load_vocabulary(spec, world=world, **llm)
    return load_vocabulary(spec, world=world)


def _image_source(images, world, max_images: int | None = None) -> ImageSource:
    """The probe images: a folder, or the world's probe split; the first `max_images` of them
    (in sorted order) when given. The subset is recorded in the run's parameters."""
    source = _full_source(images, world)
    if max_images is not None:
        if max_images < 1:
            raise BadParameter(f"--max-images must be at least 1, got {max_images}.")
        source.items = source.items[:max_images]
    return source


def _full_source(images, world) -> ImageSource:
    if images is not None:
        return ImageFolder(images)
    if world is None:
        raise BadInput("No images to dissect on: give --images DIR (a folder of images) or a "
                       "probe-world model such as probe:cnn, whose probe images are used.")
    t = world.images()
    t = t.filter(pc.equal(t["split"], "probe"))
    return ImageSource.from_table(world.id, t)


class _Masks:
    """Per-pixel concept masks of the probe world, decoded per batch: [b, concepts, H, W] bool."""

    def __init__(self, world, concepts: Sequence[str]):
        from .world.generate import rle_decode

        self.decode = rle_decode
        t = world.masks()
        self.index = {c: i for i, c in enumerate(concepts)}
        self.by_image: dict[str, list] = {}
        for iid, c, h, w, rle in zip(*(t[col].to_pylist() for col in ("image_id", "concept", "height", "width", "rle"))):
            if c in self.index:
                self.by_image.setdefault(iid, []).append((self.index[c], h, w, rle))
        self.present = sorted({ci for rows in self.by_image.values() for ci, *_ in rows})
        self.size = next(((h, w) for rows in self.by_image.values() for _, h, w, _ in rows), (1, 1))

    def batch(self, image_ids: Sequence[str]) -> torch.Tensor:
        """Masks at half the image resolution, as Network Dissection scores at half its input
        size (Broden's 112 px for 224 px): a quarter of the upsampling and IoU work, and the
        probe world's smallest concept (a few-pixel cue) still covers whole cells."""
        H, W = self.size
        out = torch.zeros(len(image_ids), len(self.index), H, W, dtype=torch.bool)
        for j, iid in enumerate(image_ids):
            for ci, h, w, rle in self.by_image.get(iid, []):
                out[j, ci] = torch.from_numpy(self.decode(rle, h, w).astype(bool))
        if H >= 32 and W >= 32:
            out = torch.nn.functional.interpolate(out.float(), size=(H // 2, W // 2), mode="area") >= 0.5
        return out


# ---- scoring ------------------------------------------------------------------------------------


def _iou_scores(target: Target, layers: list[str], source: ImageSource, masks: _Masks,
                top_fraction: float, batch_size: int, progress: bool) -> dict[str, torch.Tensor]:
    """Network Dissection IoU for every layer: one pass for the thresholds, one for the IoU.
    Concepts without any mask in the probe set get NaN (no evidence), not 0."""
    infos = {li.layer: li for li in list_layers(target)}
    n = len(source) - len(source.rejects)
    tq = {l: S.TopQuantile(infos[l].n_units, n * infos[l].grid_h * infos[l].grid_w, top_fraction) for l in layers}
    for b in source.batches(target.preprocess, batch_size, progress=progress):
        maps = activation_maps(target, layers, b.pixels)
        for l in layers:
            tq[l].update(maps[l])
    acc = {l: S.IoUAccumulator(tq[l].thresholds(), len(masks.index)) for l in layers}
    for b in source.batches(target.preprocess, batch_size, progress=progress):
        maps = activation_maps(target, layers, b.pixels)
        m = masks.batch(b.image_ids)
        for l in layers:
            acc[l].update(maps[l], m)
    out = {}
    absent = torch.ones(len(masks.index), dtype=torch.bool)
    absent[masks.present] = False
    for l in layers:
        s = acc[l].result()
        s[:, absent] = float("nan")
        out[l] = s
    return out


def _image_embeddings(enc, source: ImageSource, ids: Sequence[str], batch_size: int,
                      progress: bool) -> torch.Tensor:
    """Whole-image embeddings [n, d] in the order of `ids` (the recorder's order)."""
    got: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for b in source.batches(enc.preprocess, batch_size, progress=progress):
            for iid, v in zip(b.image_ids, enc.encode_images(b.pixels).float()):
                got[iid] = v
    return torch.stack([got[i] for i in ids])


def _text_embeddings(enc, concepts: Sequence[str], chunk: int = 1024) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([enc.encode_texts(list(concepts[i : i + chunk])).float()
                          for i in range(0, len(concepts), chunk)])


class _Lap:
    """Seconds spent per stage, for the run summary (where does a dissection spend its time?)."""

    def __init__(self, into: dict):
        self.into, self.t = into, time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.into[stage] = round(now - self.t, 2)
        self.t = now


# ---- dissect ------------------------------------------------------------------------------------


def dissect(model: str, *, store: Store | str | Path, images: str | Path | None = None,
            layers: Sequence[str] | None = None, vocabulary: str = "probe",
            scorers: Sequence[str] | None = None, encoder: str | None = None, k: int = 10,
            top_n: int = 5, batch_size: int = 64, scorer_params: dict | None = None,
            summarise_with: str | None = None, world=None, evaluate: bool = True,
            max_images: int | None = None,
            progress: bool = True, log=print) -> dict:
    """Dissect `layers` of `model` on a folder of images (or the probe world for probe models)
    and write every table of the run to `store`. Returns the run's summary.

    scorers: names from `neurostore.scorers.SCORERS` (default: all that apply; `iou` needs
    per-pixel masks, which only the probe world has). encoder: an encoder spec (default: the
    probe world's encoder for probe models, else OpenCLIP ViT-B-32). summarise_with: a scorer
    whose top concepts an LLM turns into one sentence per unit (needs ANTHROPIC_API_KEY; without
    it a template sentence is stored and marked so)."""
    from .encoders import load_encoder

    t0 = time.time()
    if not isinstance(store, Store):
        store = Store.open(store)
    if k < 1 or top_n < 1 or batch_size < 1:
        raise BadParameter(f"k={k}, top_n={top_n} and batch_size={batch_size} must all be at least 1.")
    target = load_target(model)
    world = world if world is not None else target.extra.get("world")
    if images is not None:
        world = None  # a user folder has no masks and no world labels
    source = _image_source(images, world, max_images)
    layer_names = list(dict.fromkeys(resolve_layer(target, l) for l in layers)) if layers else default_layers(target)
    names = list(scorers) if scorers else [s for s in ALL_SCORERS if s != "iou" or world is not None]
    for s in names:
        S.get_scorer(s)
    if "iou" in names and world is None:
        raise BadInput("Scorer 'iou' needs per-pixel concept masks, which only the probe world has. "
                       "Drop it from --scorer, or dissect a probe-world model.")
    params = {s: S.resolve_params(s, (scorer_params or {}).get(s)) for s in names}
    vocab = resolve_vocabulary(vocabulary, store, world=world)
    if encoder is None:
        enc = world.encoder() if world is not None else load_encoder(DEFAULT_ENCODER_ONLINE)
    else:
        enc = load_encoder(encoder)
    log(f"dissect {target.id}: {len(layer_names)} layers, {len(source)} images, vocabulary "
        f"{vocab.name} ({len(vocab)} concepts), scorers {', '.join(names)}, encoder {enc.id}")

    timings: dict[str, float] = {}
    lap = _Lap(timings)
    # 1. record
    rec = record(target, layer_names, source, k=k, batch_size=batch_size, progress=progress)
    if rec.n_images == 0:
        raise BadInput(f"No usable images in '{images or source.dataset}': all {len(source.rejects)} "
                       "files were rejected (see the reasons with --json).")
    clip_like = [s for s in names if s in ("soft_wpmi", "wpmi", "cos_cubed")]
    too_few = [s for s in clip_like if params[s].get("top_k", 0) > rec.n_images]
    for s in too_few:  # CLIP-Dissect's top_k cannot exceed the number of images
        params[s]["top_k"] = rec.n_images
    lap("record")
    # 2. patches (cut once, embedded once: every unit's evidence and the open-vocabulary index)
    ps = extract_patches(target, rec, source, encoders=[enc], batch_size=batch_size, progress=progress)
    patch_emb = torch.from_numpy(ps.embeddings[enc.id])
    row_of = {pid: i for i, pid in enumerate(ps.patch_ids)}
    lap("patches")
    # 3. vocabulary in the encoder's space
    text_emb = _text_embeddings(enc, vocab.concepts)
    lap("vocabulary")
    # 4. scores
    sim = None
    if clip_like:
        image_emb = _image_embeddings(enc, source, rec.image_ids, batch_size, progress)
        sim = S.image_text_similarity(image_emb, text_emb)
    iou = {}
    if "iou" in names:
        iou = _iou_scores(target, layer_names, source, _Masks(world, vocab.concepts),
                          params["iou"]["top_fraction"], batch_size, progress)
    score_tables, expl_tables = [], []
    for name in layer_names:
        lr = rec.layers[name]
        pooled = torch.from_numpy(lr.pooled_mean.astype(np.float32)) if lr.pooled_mean is not None else None
        idx = np.full(lr.top_idx.shape, -1, np.int64)
        for (l, u, r), pid in ps.assignment.items():
            if l == name:
                idx[u, r] = row_of[pid]
        inputs = {"similarity": sim, "pooled": pooled, "patch_emb": patch_emb, "text_emb": text_emb,
                  "unit_patches": torch.from_numpy(idx),
                  "unit_weights": torch.from_numpy(np.nan_to_num(lr.top_val.astype(np.float32), nan=0.0))}
        for s in names:
            if s == "iou":
                res = S.ScoreResult("iou", params["iou"], iou[name], S.confidence(iou[name]), False)
            else:
                res = S.run_scorer(s, inputs, {p: v for p, v in params[s].items()})
            rows = S.top_concepts(res, vocab.concepts, top_n, vocabulary=vocab.name,
                                  encoder=enc.id if res.uses_encoder else None,
                                  model=target.id, layer=name)
            score_tables.append(rows)
            summaries = None
            if summarise_with == s:
                by_unit = {}
                for (l, u, r), pid in ps.assignment.items():
                    if l == name:
                        by_unit.setdefault(u, []).append((r, ps.rows[row_of[pid]]["thumbnail"]))
                summaries = summarise(rows, s, lambda u: [png for _, png in sorted(by_unit.get(u, []))])
            expl_tables.append(explanations_table(rows, summaries))

    lap("scores")
    # 5. one run, one commit
    run_params = {"model": target.spec, "dataset": rec.dataset, "max_images": max_images, "layers": layer_names,
                  "vocabulary": vocab.name, "scorers": params, "encoder": enc.id, "k": k,
                  "top_n": top_n, "summarise_with": summarise_with}
    record_key, ds = f"record:{rec.dataset}", rec.dataset
    with store.run("dissect", run_params) as run:
        run.write("models", pa.Table.from_pylist([target.model_row()]), key=f"model:{target.id}")
        run.write("layers", pa.Table.from_pylist(layers_table_rows(target, layer_names)), key=record_key)
        if world is not None:
            run.write("images", world.images(), key=f"images:{ds}")
            run.write("masks", world.masks(), key=f"images:{ds}")
        else:
            run.write("images", source.images_table(), key=f"images:{ds}")
        run.write("rejects", source.rejects_table(), key=f"images:{ds}")
        run.write("activations", ps.fill_activations(rec.activations_table()), key=record_key)
        run.write("units", rec.units_table(), key=record_key)
        run.write("pooled", rec.pooled_table(), key=record_key)
        run.write("patches", ps.table(), key=f"patches:{target.id}:{ds}")
        run.write("embeddings", _embedding_rows(enc.id, "patch", ps.patch_ids, ps.embeddings[enc.id]),
                  key=f"patches:{target.id}:{ds}:{enc.id}")
        if sim is not None:
            run.write("embeddings", _embedding_rows(enc.id, "image", [f"{ds}/{i}" for i in rec.image_ids],
                                                    image_emb.numpy()), key=f"image-emb:{ds}:{enc.id}")
        run.write("vocabularies", vocabulary_table(vocab), key=f"vocab:{vocab.name}")
        run.write("concepts", concepts_table(vocab), key=f"vocab:{vocab.name}")
        run.write("embeddings", _embedding_rows(enc.id, "concept", vocab.concepts, text_emb.numpy()),
                  key=f"vocab:{vocab.name}:{enc.id}")
        for rows, expl in zip(score_tables, expl_tables):
            s = rows["scorer"][0].as_py() if rows.num_rows else "none"
            key = f"score:{ds}:{s}:{vocab.name}:{enc.id}"
            run.write("scores", rows, key=key)
            run.write("explanations", expl, key=key)
    # MiniLM vectors of the concepts, for SQL's semantic functions (similar_concepts).
    store.embed_concepts(vocab.name)
    lap("store")

    summary = {
        "run_id": run.run_id, "model": target.id, "spec": target.spec, "dataset": ds,
        "images": rec.n_images, "rejects": len(source.rejects), "layers": layer_names,
        "units": int(sum(rec.layers[l].n_units for l in layer_names)),
        "patches": len(ps.rows), "patch_boxes": ps.n_boxes,
        "vocabulary": vocab.name, "concepts": len(vocab), "scorers": names, "encoder": enc.id,
        "rows": dict(run.rows), "seconds": round(time.time() - t0, 1), "timings": timings,
    }
    if evaluate and world is not None:
        from .evaluate import evaluate as run_eval

        summary["evaluation"] = run_eval(store, model=target.id, dataset=ds)
        lap("evaluate")
    return summary


# ---- demo ---------------------------------------------------------------------------------------

DEMO_TARGETS = ("cnn", "vit")
# The demo dissects on the first 1,000 probe images: enough for stable top-k and IoU, and it keeps
# the cold demo (world build included) within minutes on two cores.
DEMO_MAX_IMAGES = 1000


def demo_questions(store: Store, world) -> list[dict]:
    """Three questions a user asks of a fresh store, each answered by a named query."""
    cue = world.config.cue_kind
    a, b = (f"probe-{t}" for t in DEMO_TARGETS)
    asks = [
        (f"Which neurons encode the spurious cue '{cue}', in any layer of any model?",
         "concept_neurons", {"concept": cue, "top": 10}),
        (f"Which concepts does {a} have (as some unit's best concept, patch scorer) that {b} lacks?",
         "model_concept_diff", {"model_a": a, "model_b": b, "scorer": "patch"}),
        ("How well do the explanations match the probe world's truth, per model and scorer?",
         "evaluation_summary", {}),
    ]
    out = []
    for question, name, params in asks:
        t = store.query(name, params)
        out.append({"question": question, "query": name, "params": params,
                    "rows": t.slice(0, 10).to_pylist(), "n_rows": t.num_rows})
    return out


def demo(store: Store | str | Path, *, seed: int | None = None, cue_kind: str | None = None,
         cue_class: str | None = None, fast: bool = False, cache: str | Path | None = None,
         max_images: int | None = DEMO_MAX_IMAGES, progress: bool = True, log=print) -> dict:
    """Everything on the probe world: build (or reuse) the world, dissect its CNN and ViT on
    several layers with every scorer, evaluate against the truth, and answer three questions."""
    from .world import WorldConfig, build_world
    from .world.build import with_overrides

    t0 = time.time()
    if not isinstance(store, Store):
        store = Store.open(store)
    config = with_overrides(WorldConfig.fast() if fast else WorldConfig(), seed=seed,
                            cue_kind=cue_kind, cue_class=cue_class).validate()
    world = build_world(config, cache, progress=progress)
    log(f"world {world.id} at {world.root}")
    runs = {}
    for name in DEMO_TARGETS:
        runs[name] = dissect(f"probe:{name}@{world.root}", store=store, world=world,
                             vocabulary="probe", max_images=max_images, progress=progress, log=log)
    return {
        "store": str(store.path),
        "world": {"id": world.id, "root": str(world.root), "config": world.meta["config"],
                  "targets": world.summary["targets"], "encoder": world.summary["encoder"]},
        "dissections": runs,
        "answers": demo_questions(store, world),
        "seconds": round(time.time() - t0, 1),
    }
