"""The dissection pipeline: record -> patches -> vocabulary -> scores -> explanations -> store.

Each stage is a plain function of its own module; this one only composes them, in one direction,
and hands every table to the Store in one run, so a crash leaves nothing half-written.

Write keys (what a re-run replaces): every table that belongs to a model is partitioned by
model (and layer), and each write carries the key of the work that produced it, so re-running
the same work replaces its rows and different work sits beside it:

    models                          model:<model>
    activations, units, pooled      record:<dataset>            (per model/layer partition)
    layers                          record:<dataset>:<layer>    (the table is split by model only)
    images, masks, rejects          images:<dataset>
    vocabularies, concepts          vocab:<vocabulary>
    scores, explanations            score:<dataset>:<scorer>:<vocabulary>:<encoder>  (per layer)
    evaluations                     eval:<dataset>:<layer>      (evaluation.py)

Patches, crops (image content + box -> patch) and embeddings (text, image, crop vectors) are
content-addressed: only ids the store does not hold yet are written, under a key made of those ids
(`patches:<hash>`, `crops:<hash>`, `emb:<encoder>:<kind>:<hash>`), so they sit beside earlier ones
and no re-run drops a row other work refers to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from . import scorers as S
from . import trust
from .errors import BadInput, BadParameter, listed, unknown
from .evaluation import evaluate_run, write_rows
from .explain import explanations_table, summarise
from .encoding import cached_ids, cached_vectors
from .images import CellWindows, ImageSource, ProbeMasks, probe_source
from .models import Target, default_layers, layers_table_rows, list_layers, load_target, resolve_layer
from .patches import cut_before, extract_patches
from .progress import bar as progress_bar
from .record import Recorder, activation_maps
from .results import DemoResult, DissectResult, EvaluationResult
from .schema import vector_column
from .signals import StopAtBatchEnd, sigterm_exits
from .store import Store, _atomic_write
from .vocab import Vocabulary, concepts_table, load_vocabulary, vocabulary_table

# top_images and encoder_iou are asked for by name (Scorer.opt_in): top_images' labels' confidence is
# not calibrated, encoder_iou encodes 28 windows per image (README, "Confidence and fidelity")
DEFAULT_SCORERS = tuple(s for s in S.SCORERS if not S.get_scorer(s).opt_in)
# The demo adds encoder_iou: on the probe world's small images its 28 windows each cost little (the
# ViT's dissect reuses the CNN's, _CellCache), and its labels give the best headlines there (README,
# "Confidence and fidelity")
DEMO_SCORERS = (*DEFAULT_SCORERS, "encoder_iou")
DEFAULT_ENCODER_ONLINE = "open_clip:ViT-B-32/laion2b_s34b_b79k"
# a real model's default vocabulary: CLIP-Dissect's kind (common English words); the probe
# vocabulary names only the probe world's shapes, colours and textures
DEFAULT_VOCABULARY_ONLINE = "english"
EMBEDDING_CHUNK = 65_536   # vectors per embeddings write at commit (128 MB at dim 512)


def _embedding_rows(encoder_id: str, kind: str, ids: Sequence[str], m: np.ndarray) -> pa.Table:
    return pa.table({"encoder": pa.array([encoder_id] * len(ids), pa.string()),
                     "kind": pa.array([kind] * len(ids), pa.string()),
                     "item_id": pa.array(list(ids), pa.string()),
                     "vector": vector_column(m) if len(ids) else pa.array([], pa.list_(pa.float32()))})


# ---- inputs -----------------------------------------------------------------------------------


def resolve_vocabulary(spec: str, store: Store, world=None, log=None, **llm) -> Vocabulary:
    """A vocabulary by spec. LLM vocabularies are cached in the store: the same model, domain
    and size are read back from the concepts table instead of asking the LLM again."""
    if spec.startswith("llm:"):
        from .llm import default_model
        from .vocab import llm_cache_key, llm_vocabulary_name

        domain = spec[4:].strip()
        n = int(llm.get("n", 200))
        model = llm.get("model") or default_model()
        name = llm_vocabulary_name(model, domain, n)
        # the same request's list, read back (its name was never matched before: every dissect asked again)
        stored = store.sql("SELECT v.description, list(c.concept ORDER BY c.concept) AS concepts, "
                         "list(c.category ORDER BY c.concept) AS categories FROM vocabularies v "
                         "JOIN concepts c USING (vocabulary) WHERE v.vocabulary = $v AND v.source = $s "
                         "GROUP BY v.description", {"v": name, "s": f"llm:{model}"}).to_pylist()
        if stored:
            return Vocabulary(name=name, source=f"llm:{model}", description=stored[0]["description"],
                              concepts=stored[0]["concepts"], categories=stored[0]["categories"],
                              cache_key=llm_cache_key(model, domain, n), meta={"cached": True, "model": model})
        vocab = load_vocabulary(spec, world=world, **llm)
    else:
        vocab = load_vocabulary(spec, world=world)
    if spec.startswith(("file:", "llm:")):
        named = _own_name(vocab, store)
        if named.name != vocab.name and log is not None:
            log(f"note: the store's vocabulary {vocab.name} holds other concepts (another file of that name, this "
                f"one before an edit, or another reply of the LLM); these are stored as {named.name}")
        vocab = named
    return vocab


def _own_name(vocab: Vocabulary, store: Store) -> Vocabulary:
    """A file vocabulary is named for its file ('file:animals'); where the store already holds
    that name with other concepts (another animals.txt, or this one edited), the name gets a hash
    of the concepts ('file:animals-3f9a1c'), so a run never replaces another file's concepts,
    scores and explanations under the same name. The same for an LLM's list."""
    held = store.sql("SELECT concept FROM concepts WHERE vocabulary = $v", {"v": vocab.name})["concept"].to_pylist()
    if not held or set(held) == set(vocab.concepts):
        return vocab
    digest = hashlib.sha1("\n".join(sorted(vocab.concepts)).encode()).hexdigest()[:6]
    return dataclasses.replace(vocab, name=f"{vocab.name}-{digest}")


# ---- embeddings: computed once per (encoder, kind, item), reused across runs ---------------------


def _stored_patch_ids(store: Store) -> frozenset:
    """Patch ids whose rows (with thumbnails) the store holds: content-addressed, never rewritten."""
    if "patches" not in store.tables():
        return frozenset()
    return frozenset(store.sql("SELECT DISTINCT patch_id FROM patches").column("patch_id").to_pylist())


def _thumbnails(store: Store, ids: Sequence[str]) -> dict[str, bytes]:
    if not ids:
        return {}
    t = store.sql("SELECT patch_id, any_value(thumbnail) AS thumbnail FROM patches JOIN (SELECT unnest($ids) "
                  "AS patch_id) w USING (patch_id) GROUP BY patch_id", {"ids": list(dict.fromkeys(ids))})
    return dict(zip(t.column("patch_id").to_pylist(), t.column("thumbnail").to_pylist()))


def _ids_key(ids: Sequence[str]) -> str:
    """Write key of a set of content-addressed rows: new vectors sit beside the old ones, and a
    retried run replaces only its own."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def _text_embeddings(enc, store: Store, concepts: Sequence[str], counts: dict, progress: bool,
                     chunk: int = 256) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """[c, d] concept vectors; only texts without a stored vector for this encoder are encoded.
    Returns (all vectors, new texts, their vectors)."""
    have = cached_vectors(store, enc.id, "concept", concepts)
    todo = [c for c in dict.fromkeys(concepts) if c not in have]
    new = []
    bar = progress_bar(len(todo), "texts", "text", progress and bool(todo))
    with torch.no_grad():
        for i in range(0, len(todo), chunk):
            new.append(enc.encode_texts(list(todo[i : i + chunk])).float().cpu().numpy())
            bar.update(len(todo[i : i + chunk]))
    bar.close()
    counts["texts"] += len(todo)
    new_m = np.concatenate(new) if new else np.zeros((0, enc.dim), np.float32)
    have.update(zip(todo, new_m))
    return torch.from_numpy(np.stack([have[c] for c in concepts])), todo, new_m


# ---- resume -------------------------------------------------------------------------------------

CHECKPOINT_VERSION = 1


def _weights_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _work_id(target: Target, source: ImageSource, identity: dict) -> str:
    """The identity of a dissect's single pass: model weights, every image (id, path, size,
    mtime), and every parameter that changes what the pass folds. A checkpoint of other work
    has another id and is never read."""
    from . import __version__

    h = hashlib.sha1(json.dumps({**identity, "version": __version__, "checkpoint": CHECKPOINT_VERSION,
                                 "spec": target.spec, "weights": _weights_hash(target.module)},
                                sort_keys=True, default=str).encode())
    for iid, path in source.items:
        try:
            st = os.stat(path)
            h.update(f"\0{iid}\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\0{iid}\0{path}\0-".encode())
    return h.hexdigest()[:20]


class _Checkpoint:
    """The pass's state in one file under the store's `checkpoints/`, written atomically (the
    store's _atomic_write) every `every` seconds, read back by the same work, removed at commit.
    Once the pass has ended it no longer changes: `save_ended` writes it once more, and after that
    only the crop vectors encoded since the last save, each lot in a file of its own beside it
    (rewriting the whole pass with every lot cost its size each time: 46.8 MB at 10,000 images
    for one resnet18 layer, about 1 GB of pooled activations for a ResNet-50 at 50,000 images)."""

    def __init__(self, store: Store, work_id: str, every: float):
        self.path = Path(store.path) / "checkpoints" / f"dissect-{work_id}.pt"
        self.every, self.last = every, time.time()
        # the crop vectors load() found, for the patch stage; the rest of what it found goes to
        # the pass, which need not keep it alive beside its own
        self.patch_vectors: dict = {}
        self.ended_saved = False          # the ended pass is on disk
        self.crops_saved: dict = {}       # encoder -> crop vectors on disk (the first rows of patch_vectors)

    def _lots(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.crops-*.pt"))

    def load(self) -> dict | None:
        """The saved pass, or None; the crop lots are read whatever the pass file holds (their
        vectors are keyed by crop content, so a pass begun again still uses them)."""
        ids: dict = {}
        parts: dict = {}
        data = _read(self.path) if self.path.exists() else None
        # (a checkpoint of the version before the lots holds its crops in the pass file)
        for lot in [(data or {}).get("patch_vectors", {}), *(_read(f) or {} for f in self._lots())]:
            for e, (i, m) in lot.items():
                ids.setdefault(e, []).extend(i)
                parts.setdefault(e, []).append(np.asarray(m))
        self.patch_vectors = {e: (ids[e], np.concatenate(parts[e])) for e in ids}
        self.crops_saved = {e: len(i) for e, i in ids.items()}
        return data

    def due(self) -> bool:
        return time.time() - self.last >= self.every

    def maybe_save(self, state) -> bool:
        if not self.due():
            return False
        self.save(state)
        return True

    def save(self, state) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = state()
        _atomic_write(self.path, lambda f: torch.save(data, f))
        self.last = time.time()

    def save_ended(self, state, vectors: dict) -> None:
        """The ended pass (`state`, once) and the crop vectors of extract_patches' `encoded`
        (`vectors`) not on disk yet, as a new lot."""
        if not self.ended_saved:
            self.save(state)
            self.ended_saved = True
        lot = {e: (ids[self.crops_saved.get(e, 0):], m[self.crops_saved.get(e, 0):])
               for e, (ids, m) in _whole_rows(vectors).items()}
        lot = {e: v for e, v in lot.items() if len(v[0])}
        if lot:
            path = self.path.with_name(f"{self.path.stem}.crops-{len(self._lots()):05d}.pt")
            _atomic_write(path, lambda f: torch.save(lot, f))
            for e, (ids, _) in lot.items():
                self.crops_saved[e] = self.crops_saved.get(e, 0) + len(ids)
        self.last = time.time()

    def remove(self) -> None:
        # the checkpoint, its crop lots, the window spill, and the temporary files of a write that was killed
        for pattern in (f"{self.path.stem}.*", f".{self.path.stem}.*"):
            for f in self.path.parent.glob(pattern):
                f.unlink(missing_ok=True)


def _read(path: Path) -> dict | None:
    """A checkpoint file, or None where it is damaged: that costs the work it held (a pass run
    again, a lot's crops encoded again), never the run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return None


# ---- the single pass ----------------------------------------------------------------------------


def _unencoded(b, done: dict) -> tuple[list[str], list[int]]:
    """The images of batch `b` whose `also` view was made (b.also_rows) and whose vector is not in
    `done` yet: their content hashes and their rows in b.also."""
    pairs = [(b.hashes[j], i) for i, j in enumerate(b.also_rows) if b.hashes[j] not in done]
    return [h for h, _ in pairs], [i for _, i in pairs]


def _single_pass(target: Target, layer_names: list[str], source: ImageSource, enc, *, k: int,
                 batch_size: int, workers: int, precision, image_emb: bool, iou_fraction: float | None,
                 known_images: frozenset, ckpt: _Checkpoint, counts: dict, progress: bool, log=print):
    """Decode each probe image once and run it through the target once: the same batch feeds the
    recorder (top-k, the maps of each unit's top images, pooled activations), the IoU thresholds
    and the encoder's whole-image embedding (its own preprocessing of the same decoded image).
    Returns (recorder, thresholds per layer or None, {image hash: new vector}, hashes in
    recorder order, first item this process read, the pass's checkpoint state)."""
    infos = {li.layer: li for li in list_layers(target)}
    tq = {}
    if iou_fraction is not None:
        n = len(source)
        tq = {l: S.TopQuantile(infos[l].n_units, n * infos[l].grid_h * infos[l].grid_w, iou_fraction)
              for l in layer_names}
    rec = Recorder(target, layer_names, k=k, dataset=source.dataset, keep_maps=True, precision=precision,
                   on_maps=(lambda layer, m: tq[layer].update(m)) if tq else None)
    for q in tq.values():
        q.top = q.top.to(rec.device)
    new_images: dict[str, np.ndarray] = {}
    hashes: list[str] = []
    start = 0
    saved = ckpt.load()
    if saved is not None:
        rec.load_state_dict(saved["recorder"])
        for l, (top, seen) in saved["tq"].items():
            tq[l].top, tq[l].seen = top.to(rec.device), seen
        new_images, hashes, start = saved["new_images"], saved["hashes"], saved["position"]
        source.rejects, source.sizes = saved["rejects"], saved["sizes"]

    def state():
        return {"recorder": rec.state_dict(), "tq": {l: (q.top.cpu(), q.seen) for l, q in tq.items()},
                "new_images": new_images, "hashes": hashes, "position": source.position,
                "rejects": list(source.rejects), "sizes": dict(source.sizes)}

    # the encoder's half of the batch: uint8 from the workers, normalised on the device
    also = ((enc.split_preprocess() or enc.preprocess),) if image_emb else ()
    with rec, torch.no_grad(), StopAtBatchEnd() as stop:
        batches = source.batches(target.preprocess, batch_size, num_workers=workers, progress=progress,
                                 start=start, also=also, skip_also=known_images, device=rec.device)
        while stop.asked is None:
            try:
                b = next(batches, None)
            except Exception:
                if stop.asked is None:
                    raise
                b = None   # the loader's workers took the Ctrl-C too: the state is the last whole batch's
            if b is None:
                break
            counts["decoded"] += len(b.image_ids) + len(b.rejects)
            rec.update(b.image_ids, b.pixels)
            hs, rows = _unencoded(b, new_images)
            if rows:
                vecs = enc.encode_images(b.also[0][rows]).float().cpu().numpy()  # [m, d]
                counts["images"] += len(rows)
                new_images.update(zip(hs, vecs))
            hashes += b.hashes
            if ckpt.maybe_save(state):
                counts["checkpoints"] += 1
        batches.close()
        if stop.asked is not None:
            log(f"stopped: saving the image pass at image {source.position} of {len(source)} "
                "to the store's checkpoints/ first")
            ckpt.save(state)
            raise stop.stop()
    counts["target_passes"] += 1
    rec.rejects = list(source.rejects)
    # The images that were usable are known only now: the threshold is the ceil(fraction * values
    # seen)-th largest (TopQuantile kept at least that many, sized for every file of the source).
    thresholds = {l: q.top[:, max(1, math.ceil(iou_fraction * q.seen)) - 1].cpu() for l, q in tq.items()}
    # the pass as it ended: the source is read again later (the IoU pass), so its place is taken now
    ended = {"position": source.position, "rejects": list(source.rejects), "sizes": dict(source.sizes),
             "hashes": list(hashes), "new_images": dict(new_images)}
    return rec, thresholds or None, new_images, hashes, start, lambda: {**state(), **ended}


class _CellCache:
    """encoder_iou's window embeddings kept in the store (kind 'cell'), one row per window,
    keyed `{image content hash}/{geometry}/{cell}`: the geometry (grid, window rule, the
    target's crop) is in the key, so a target that sees another part of the image cuts its
    own. A second dissect of the same images (another model, other layers) encodes none.
    Stored windows are read PREFETCH images at a time in the pass's order (`order`: the image
    hashes as the first pass met them), as one query each scans the table's cell rows. Windows
    this run encodes go to a file, not memory (28 x dim float32 per image: 2.9 GB at 50,000
    images, dim 512), and reach the store from there a chunk at a time (`vectors`). With `spill`
    (a path beside the dissect's checkpoint) the file outlives an interrupted run: the images its
    index names (saved every `every` seconds, after the rows it names are synced) are not encoded
    again by the same work resumed; without, it is a temporary file."""

    PREFETCH = 8192   # images (28 x dim float32 each: 470 MB at dim 512)

    def __init__(self, store: Store, encoder_id: str, windows: CellWindows, order: Sequence[str] = (),
                 spill: Path | None = None, every: float = 120.0):
        cf = "full" if windows.crop_fraction is None else f"{windows.crop_fraction:g}"
        self.store, self.encoder_id, self.windows = store, encoder_id, windows
        self.geometry, self.n = f"g{windows.grid}w2bc{cf}", S.cell_windows(windows.grid)
        self.order, self.at = list(order), {h: i for i, h in enumerate(order)}
        self.new: dict[str, int] = {}                 # image hash -> its place in the spill (encoded by this work)
        self.recent: dict[str, np.ndarray] = {}       # image hash -> [n, d] of the last batch encoded
        self.read: dict[str, np.ndarray] = {}         # image hash -> [n, d] stored (the current chunk)
        self.dim, self.index, self.every, self.saved = 0, None, every, time.time()
        if spill is None:
            self.spill = tempfile.TemporaryFile(prefix="neurostore-windows-")
        else:
            self.index = spill.with_name(spill.name + ".json")
            spill.parent.mkdir(parents=True, exist_ok=True)
            self.spill = open(spill, "a+b")
            self._resume()
        self.known = frozenset()
        if "embeddings" in store.tables():               # images whose every window is stored
            t = store.sql("SELECT split_part(item_id, '/', 1) AS h FROM embeddings "
                          "WHERE encoder = $e AND kind = 'cell' AND split_part(item_id, '/', 2) = $g "
                          "GROUP BY h HAVING count(DISTINCT item_id) = $n",
                          {"e": encoder_id, "g": self.geometry, "n": self.n})
            self.known = frozenset(t.column("h").to_pylist())

    def ids(self, h: str) -> list[str]:
        return [f"{h}/{self.geometry}/{i}" for i in range(self.n)]

    def _resume(self) -> None:
        """Take the windows an interrupted run of the same work spilled and indexed; rows past
        the index (written after its last save) are cut off. An index of another geometry or
        encoder, or a damaged one, costs the work, never the run."""
        try:
            ix = json.loads(self.index.read_text())
            hashes, dim = list(ix["hashes"]), int(ix["dim"])
            size = len(hashes) * self.n * dim * 4
            if ((ix["encoder"], ix["geometry"], ix["n"]) != (self.encoder_id, self.geometry, self.n)
                    or os.fstat(self.spill.fileno()).st_size < size):
                raise ValueError("not this work's windows")
        except Exception:   # none, damaged, or not this work's
            hashes, dim, size = [], 0, 0
        self.spill.truncate(size)
        self.dim, self.new = dim, {h: i for i, h in enumerate(hashes)}

    def add(self, hashes: Sequence[str], emb: np.ndarray) -> None:
        """This run's windows [len(hashes), n, d] of new images, appended to the spill."""
        emb = np.ascontiguousarray(emb, np.float32)
        self.dim = emb.shape[-1]
        self.spill.seek(0, os.SEEK_END)
        self.spill.write(emb.tobytes())
        self.new.update(zip(hashes, range(len(self.new), len(self.new) + len(hashes))))
        self.recent = dict(zip(hashes, emb))
        if self.index is not None and time.time() - self.saved >= self.every:
            self.save_index()

    def save_index(self) -> None:
        """Name the spilled images a resumed run may take: the rows first reach the disk, then
        the index replaces the old one atomically."""
        self.spill.flush()
        os.fsync(self.spill.fileno())
        _atomic_write(self.index, json.dumps({"encoder": self.encoder_id, "geometry": self.geometry, "n": self.n,
                                              "dim": self.dim, "hashes": list(self.new)}))
        self.saved = time.time()

    def _spilled(self) -> np.ndarray:
        """[images, n, d] view of the spill (read from disk as it is indexed)."""
        self.spill.flush()
        return np.memmap(self.spill, np.float32, "r", shape=(len(self.new), self.n, self.dim))

    def lookup(self, hashes: Sequence[str]) -> np.ndarray:
        """[len(hashes), n, d]: this run's new windows, else the stored ones."""
        older = [h for h in hashes if h in self.new and h not in self.recent]   # an image seen batches ago
        spilled = self._spilled() if older else None
        miss = [h for h in hashes if h not in self.new and h not in self.read]
        if miss:
            start = min(self.at.get(h, len(self.order)) for h in miss)
            keep = {h: self.read[h] for h in hashes if h in self.read}      # a batch across two chunks
            chunk = [h for h in dict.fromkeys([h for h in self.order[start:start + self.PREFETCH]
                                                if h in self.known] + miss) if h not in keep]
            got = cached_vectors(self.store, self.encoder_id, "cell", [i for h in chunk for i in self.ids(h)])
            self.read = {**keep, **{h: np.stack([got[i] for i in self.ids(h)]) for h in chunk}}
        return np.stack([self.recent[h] if h in self.recent else spilled[self.new[h]] if h in self.new
                         else self.read[h] for h in hashes])

    def vectors(self) -> tuple[Sequence[str], np.ndarray | None]:
        """(ids, [rows, d]) of the windows this run encoded, for the store: a view of the spill,
        which _commit writes a chunk at a time."""
        if not self.new:
            return [], None
        return _WindowIds(self, list(self.new)), self._spilled().reshape(-1, self.dim)


class _WindowIds(Sequence):
    """The window ids of `hashes` in order, made a slice at a time (1.4M strings at 50,000 images)."""

    def __init__(self, cache: _CellCache, hashes: list[str]):
        self.cache, self.hashes = cache, hashes

    def __len__(self) -> int:
        return len(self.hashes) * self.cache.n

    def __getitem__(self, at):
        if isinstance(at, int):
            at = range(len(self))[at]
            return self[at:at + 1][0]
        lo, hi, _ = at.indices(len(self))
        n = self.cache.n
        ids = [i for h in self.hashes[lo // n:-(-hi // n)] for i in self.cache.ids(h)]
        return ids[lo - lo // n * n:hi - lo // n * n]


def _iou_scores(target: Target, layers: list[str], source: ImageSource, thresholds: dict[str, torch.Tensor],
                batch_size: int, workers: int, counts: dict, progress: bool, *, masks: ProbeMasks | None = None,
                cells: tuple | None = None) -> dict[str, tuple[dict, dict]]:
    """Network Dissection IoU for every layer, against the thresholds the single pass found (the
    dataset-wide quantile must be known before any image is scored: a second pass), with
    `masks` (the probe world's truth: scorer iou; concepts without any mask in the probe set get
    NaN, no evidence, not 0) and/or `cells` = (encoder, text_emb [c, d], baseline [c], _CellCache):
    the encoder's pseudo-masks (scorer encoder_iou; S.cell_concepts; windows the cache holds are
    not encoded again, new ones are added to it), one pass for both. Also each
    one's null, the best IoU per pseudo-unit (trust.NullIoU), fed the same batches.
    Returns {(scorer, layer): ([u, c] IoU, [m] null best)}."""
    kinds = {}
    if masks is not None:
        kinds["iou"] = len(masks.index)
    also, cache = (), None
    if cells is not None:
        enc, text_emb, baseline, cache = cells
        kinds["encoder_iou"] = text_emb.shape[0]
        also = (cache.windows,)
    acc = {(k, l): S.IoUAccumulator(thresholds[l].cpu(), n) for k, n in kinds.items() for l in layers}
    null = {(k, l): trust.NullIoU(thresholds[l].numel(), n) for k, n in kinds.items() for l in layers}
    for b in source.batches(target.preprocess, batch_size, num_workers=workers, progress=progress, also=also,
                            skip_also=cache.known if cache else frozenset(), device=target.device):
        counts["decoded"] += len(b.image_ids) + len(b.rejects)
        maps = activation_maps(target, layers, b.pixels)
        given = {}
        if masks is not None:
            given["iou"] = masks.batch(b.image_ids)
        if cells is not None:
            hs, rows = _unencoded(b, cache.new)
            if rows:                                                           # windows [m, n, 3, s, s]
                w = b.also[0][rows]
                emb = enc.encode_images(w.flatten(0, 1)).float().view(w.shape[0], w.shape[1], -1)
                counts["cells"] += w.shape[0] * w.shape[1]
                cache.add(hs, emb.cpu().numpy())
            emb = torch.from_numpy(cache.lookup(b.hashes)).to(text_emb.device)   # [b, n, d]
            given["encoder_iou"] = S.label_map(S.cell_concepts(emb, text_emb, baseline))
        for (k, l), a in acc.items():
            a.update(maps[l].cpu(), given[k])
            null[(k, l)].update(maps[l].cpu(), given[k])
    counts["target_passes"] += 1
    absent = {k: torch.zeros(n, dtype=torch.bool) for k, n in kinds.items()}   # concepts no image has
    if masks is not None:
        absent["iou"][:] = True
        absent["iou"][masks.present] = False
    out = {}
    for (k, l), a in acc.items():
        s = a.result()
        s[:, absent[k]] = float("nan")
        out[(k, l)] = (s, null[(k, l)].best(absent[k]))
    return out


class _Lap:
    """Seconds spent per stage, for the run summary (where does a dissection spend its time?)."""

    def __init__(self, into: dict):
        self.into, self.t = into, time.time()

    def __call__(self, stage: str) -> None:
        now = time.time()
        self.into[stage] = round(now - self.t, 2)
        self.t = now


# ---- dissect: a plan of stages ------------------------------------------------------------------


@dataclass
class _Dissection:
    """One dissect's plan (what to do, fixed before any work) and what its stages add to it in
    order: vocabulary -> one pass -> patches -> scores and trust -> evaluation -> commit."""

    store: Store
    target: Target
    layers: list[str]
    source: ImageSource
    mask_world: object                   # the probe world whose masks are the truth, or None
    vocab: Vocabulary
    enc: object                          # the vision-language encoder
    scorers: list[str]
    params: dict[str, dict]              # per scorer, defaults merged (fitted to the images after the pass)
    needs: frozenset[str]                # the inputs the scorers need (scorers.Scorer.needs)
    device: torch.device
    dtype: torch.dtype
    opts: dict                           # k, top_n, batch_size, workers, max_images, summarise_with, ...
    timings: dict = field(default_factory=dict)
    counts: dict = field(default_factory=lambda: {"decoded": 0, "target_passes": 0, "texts": 0, "images": 0,
                                                  "crops": 0, "cells": 0, "checkpoints": 0})
    text_emb: torch.Tensor | None = None  # [c, d] the concepts in the encoder's space
    new_vectors: list = field(default_factory=list)  # (encoder, kind, ids, [n, d]) the store lacks
    rec: object = None                    # the recorder's result
    thresholds: dict | None = None        # layer -> [units] IoU thresholds
    new_images: dict = field(default_factory=dict)   # image hash -> [d] vector
    hashes: list = field(default_factory=list)       # image hashes in recorder order
    resumed: int = 0
    ckpt: _Checkpoint | None = None
    pass_state: object = None             # the ended image pass's checkpoint state (a callable)
    patch_vectors: dict = field(default_factory=dict)  # encoder -> ([patch ids], [[b, d]]) crops encoded so far
    ps: object = None                     # the patch set (patches.extract_patches)
    stored_patches: frozenset = frozenset()
    patch_emb: torch.Tensor | None = None  # [boxes, d]
    score_tables: list = field(default_factory=list)
    expl_tables: list = field(default_factory=list)
    trust_tables: list = field(default_factory=list)
    nulls: dict = field(default_factory=dict)
    evaluation: EvaluationResult | None = None


def _plan(store: Store, model: str, *, images, layers, vocabulary, scorers, encoder, scorer_params, world,
          device, precision, opts: dict) -> _Dissection:
    """Check the request and load what it names; bad input fails here, before any work."""
    from .devices import cpu_bf16, describe, resolve_device, resolve_precision
    from .encoders import load_encoder
    from .features import attach

    for key, least in (("k", 1), ("top_n", 1), ("batch_size", 1), ("workers", 0)):
        if opts[key] < least:   # one at a time, so the CLI can name its flag (errors.cli_message)
            raise BadParameter(f"{key}={opts[key]} must be at least {least}.")
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    target = load_target(model).to(dev, precision)
    attach(target, store)  # the store's dictionary features of this model are layers too
    world = world if world is not None else target.extra.get("world")
    # A user folder has no masks and no world labels; a probe model still uses its world's encoder.
    mask_world = None if images is not None else world
    source = probe_source(images, mask_world, opts["max_images"])
    layer_names = list(dict.fromkeys(resolve_layer(target, l) for l in layers)) if layers else default_layers(target)
    names = list(scorers) if scorers else [s for s in DEFAULT_SCORERS
                                           if mask_world is not None or not S.get_scorer(s).needs_masks()]
    masked = [s for s in names if S.get_scorer(s).needs_masks()]  # (unknown names fail here)
    if masked and mask_world is None:
        raise BadInput(f"Scorer {', '.join(repr(s) for s in masked)} needs per-pixel concept masks, which only "
                       "the probe world has. Drop it from --scorer, or dissect a probe-world model on its own "
                       "probe images.")
    params = {s: S.resolve_params(s, (scorer_params or {}).get(s)) for s in names}
    fractions = {params[s]["top_fraction"] for s in names if S.get_scorer(s).needs_thresholds()}
    if len(fractions) > 1:   # one pass finds one threshold per unit
        raise BadParameter(f"iou and encoder_iou need the same top_fraction (given {sorted(fractions)}).")
    if opts.get("summarise_with") and opts["summarise_with"] not in names:   # it was ignored silently
        raise BadParameter(unknown("scorer to summarise", opts["summarise_with"], names,
                                   "summarise_with names one of this dissect's scorers."))
    if vocabulary is None:   # as the encoder: the probe world's for probe models, else the online default
        vocabulary = "probe" if world is not None else DEFAULT_VOCABULARY_ONLINE
    vocab = resolve_vocabulary(vocabulary, store, world=mask_world, log=opts["log"])
    drawn = {c for cs in mask_world.concepts.values() for c in cs} if masked else set()
    if masked and not drawn & set(vocab.concepts):
        # a mask scorer has no concept to find in the world's masks (its null then had no units)
        if scorers:
            raise BadInput(f"Scorer {', '.join(masked)} reads the probe world's masks, and vocabulary {vocab.name} has "
                           f"none of the concepts the world draws (e.g. {', '.join(sorted(drawn)[:5])}). Use "
                           "--vocab probe, or leave it out.")
        names = [s for s in names if s not in masked]
        params = {s: params[s] for s in names}
        opts["log"](f"note: {', '.join(masked)} left out: vocabulary {vocab.name} has none of the concepts the probe "
                    "world draws, so its masks hold nothing to score")
    if encoder is None:
        enc = world.encoder() if world is not None else load_encoder(DEFAULT_ENCODER_ONLINE, device=dev,
                                                                       precision=precision)
    else:
        enc = load_encoder(encoder, worlds=[str(world.root)] if world is not None else (), device=dev,
                           precision=precision)
    if not set(vocab.concepts) <= cached_ids(store, enc.id, "concept"):
        enc.module  # texts to encode: the encoder's weights built (or downloaded) here, before any work
    opts["log"](f"dissect {target.id}: {len(layer_names)} layers, {len(source)} images, vocabulary "
        f"{vocab.name} ({len(vocab)} concepts), scorers {', '.join(names)}, encoder {enc.id}, "
        f"device {describe(dev)}")
    auto = (precision or "auto").strip().lower() == "auto"   # read as resolve_precision reads it
    if world is None and auto and dtype is None and dev.type == "cpu" and cpu_bf16():
        opts["log"]("note: this CPU computes bf16 natively: --precision bf16 encodes crops 2-2.5x faster "
                    "(auto keeps fp32 on a CPU, so results do not depend on the machine)")
    needs = frozenset().union(*(S.get_scorer(s).needs() for s in names))
    return _Dissection(store, target, layer_names, source, mask_world, vocab, enc, names, params, needs, dev,
                       dtype, opts)


def _vocabulary(d: _Dissection) -> None:
    """The concepts in the encoder's space (stored vectors reused), and MiniLM vectors of the
    concepts the store lacks, for SQL's semantic functions (similar_concepts)."""
    from .textembed import MINILM_ID, embed_texts

    d.text_emb, new_texts, new_text_m = _text_embeddings(d.enc, d.store, d.vocab.concepts, d.counts,
                                                         d.opts["progress"])
    d.new_vectors.append((d.enc.id, "concept", new_texts, new_text_m))
    have = cached_ids(d.store, MINILM_ID, "concept")
    missing = sorted(c for c in dict.fromkeys(d.vocab.concepts) if c not in have)
    if missing:
        d.new_vectors.append((MINILM_ID, "concept", missing, embed_texts(missing, device=d.device)))  # [m, 384]


def _one_pass(d: _Dissection) -> None:
    """Each image decoded once, run through the target once (checkpointed, resumable); the
    whole-image embeddings and IoU thresholds only when a scorer needs them."""
    o = d.opts
    image_emb = "similarity" in d.needs
    # the IoU input is computed with the top_fraction of the scorer that asks for it
    iou_fraction = next((d.params[s]["top_fraction"] for s in d.scorers if S.get_scorer(s).needs_thresholds()), None)
    identity = {"dataset": d.source.dataset, "layers": d.layers, "k": o["k"], "encoder": d.enc.id,
                "image_emb": image_emb, "iou_top_fraction": iou_fraction, "precision": str(d.dtype),
                "device": d.device.type, "max_images": o["max_images"]}
    d.ckpt = _Checkpoint(d.store, _work_id(d.target, d.source, identity), o["checkpoint_every"])
    known_images = cached_ids(d.store, d.enc.id, "image") if image_emb else frozenset()
    rec, d.thresholds, d.new_images, d.hashes, d.resumed, state = _single_pass(
        d.target, d.layers, d.source, d.enc, k=o["k"], batch_size=o["batch_size"], workers=o["workers"],
        precision=d.dtype, image_emb=image_emb, iou_fraction=iou_fraction, known_images=known_images,
        ckpt=d.ckpt, counts=d.counts, progress=o["progress"], log=o["log"])
    d.rec = rec.result()
    if d.rec.n_images == 0:   # nothing to keep or resume: the same files would be rejected again
        d.ckpt.remove()
        why = "; ".join(f"{Path(r['path']).name}: {r['reason']}" for r in d.source.rejects[:3])
        raise BadInput(f"No usable images in '{o['images'] or d.source.dataset}': all {len(d.source.rejects)} "
                       f"files were rejected ({why}{'; ...' if len(d.source.rejects) > 3 else ''}). "
                       "Give a folder of JPEG, PNG or other images PIL can read.")
    if d.rec.n_images < 2:   # a unit's contrast over images (every scorer's null) needs two at least
        d.ckpt.remove()
        raise BadInput(f"Only one usable image in '{o['images'] or d.source.dataset}' "
                       f"({len(d.source.rejects)} files rejected): a dissect compares images, so it needs two "
                       "at least (hundreds for explanations worth reading).")
    d.pass_state = state   # the whole pass: what an interrupted later stage keeps (dissect)
    # the crops an interrupted run of this work encoded (lots beside its ended pass): not encoded again
    ids, m = d.ckpt.patch_vectors.get(d.enc.id, ([], None))
    d.patch_vectors = {d.enc.id: (list(ids), [torch.from_numpy(m)] if len(ids) else [])}
    if d.resumed:
        o["log"](f"resumed from a checkpoint at image {d.resumed} of {len(d.source)}")
    d.params = {s: S.get_scorer(s).prepared(p, d.rec.n_images) for s, p in d.params.items()}
    if d.new_images:
        d.new_vectors.append((d.enc.id, "image", list(d.new_images), np.stack(list(d.new_images.values()))))


def _patches(d: _Dissection) -> None:
    """Boxes from the maps kept for each unit's top images; each crop embedded once. Boxes the
    store's `crops` table holds (by image content) are neither cut nor hashed again."""
    enc = d.enc
    d.stored_patches = _stored_patch_ids(d.store)
    before = frozenset(d.patch_vectors[enc.id][0])   # encoded by an interrupted run of this work

    def checkpoint() -> None:   # as in the pass: a run killed outright keeps the crops of its last one
        if d.ckpt.due():
            d.ckpt.save_ended(d.pass_state, d.patch_vectors)
            d.counts["checkpoints"] += 1

    d.ps = ps = extract_patches(d.target, d.rec, d.source, encoders=[enc],
                                known={enc.id: cached_ids(d.store, enc.id, "patch") | before},
                                stored=d.stored_patches, hashes=d.hashes, cut=cut_before(d.store, d.hashes),
                                batch_size=d.opts["batch_size"], progress=d.opts["progress"],
                                workers=d.opts["workers"], encoded=d.patch_vectors,
                                on_chunk=checkpoint)
    d.counts["crops"] += ps.n_encoded
    d.counts["decoded_for_crops"] = ps.n_decoded
    new_ids, new_m = ps.embeddings[enc.id]
    d.new_vectors.append((enc.id, "patch", new_ids, new_m))
    vec = dict(zip(new_ids, new_m))
    vec.update(cached_vectors(d.store, enc.id, "patch", [p for p in ps.patch_ids if p not in vec]))
    # [boxes, d]: every box cut (as before content ids); each layer's scorers take its own (_layer_inputs)
    d.patch_emb = torch.from_numpy(np.stack([vec[p] for p in ps.boxes])) if ps.boxes \
        else torch.zeros(0, d.text_emb.shape[1])


def _scores(d: _Dissection) -> None:
    """Every scorer on every layer from the inputs the scorers need, each with its calibrated
    confidence (from the layer's null); held-out fidelity and headlines per layer (trust)."""
    rec, o = d.rec, d.opts
    held = int(trust.heldout(rec.image_ids).sum())
    if held < trust.MIN_HELDOUT:
        o["log"](f"note: {held} of {len(rec.image_ids)} probe images are held out for fidelity, which needs "
                 f"{trust.MIN_HELDOUT} (a hash picks a fifth of the images: about {round(1.25 * trust.MIN_HELDOUT / trust.HELDOUT_FRACTION)} "
                 "probe images): "
                 "confidences rest on the null and the margin alone")
    sim = None
    if "similarity" in d.needs:
        vec = dict(d.new_images)
        vec.update(cached_vectors(d.store, d.enc.id, "image", [h for h in d.hashes if h not in vec]))
        image_emb = torch.from_numpy(np.stack([vec[h] for h in d.hashes]))  # [n, d] recorder order
        sim = S.Similarity(image_emb, d.text_emb, device=d.device)  # [n, c], computed a column tile at a time
    ious = {}   # (scorer, layer) -> (IoU, null best)
    if {"iou_scores", "encoder_iou_scores"} & d.needs:
        masks = ProbeMasks(d.mask_world, d.vocab.concepts) if "iou_scores" in d.needs else None
        cells = None
        if "encoder_iou_scores" in d.needs:
            # a concept's baseline: its mean cosine over the probe images (the mean image embedding's)
            mean_img = torch.nn.functional.normalize(image_emb.float(), dim=-1).mean(dim=0)
            baseline = torch.nn.functional.normalize(d.text_emb.float(), dim=-1) @ mean_img
            windows = CellWindows(d.enc.preprocess, S.CELL_GRID, getattr(d.target, "crop_fraction", None))
            cache = _CellCache(d.store, d.enc.id, windows, d.hashes, spill=d.ckpt.path.with_suffix(".windows"),
                               every=o["checkpoint_every"])
            cells = (d.enc, d.text_emb.to(d.device), baseline.to(d.device), cache)
        try:
            ious = _iou_scores(d.target, d.layers, d.source, d.thresholds, o["batch_size"], o["workers"], d.counts,
                               o["progress"], masks=masks, cells=cells)
        finally:   # however the pass ends (done, Ctrl-C, an error), the same command encodes none of its windows again
            if cells is not None:
                cache.save_index()
        if cells is not None and cache.new:
            d.new_vectors.append((d.enc.id, "cell", *cache.vectors()))
    cindex = {c: i for i, c in enumerate(d.vocab.concepts)}
    amount = None  # [n, c] mask area per probe image: the truth's fidelity
    if d.mask_world is not None and sim is not None:
        amount = trust.mask_amount(d.mask_world.masks(), rec.image_ids, cindex)
    bar = progress_bar(len(d.layers) * len(d.scorers), "scores", "scorer", o["progress"])
    for name in d.layers:
        iou = lambda s: ious.get((s, name), (None, None))   # noqa: E731  (scores, null best) of an IoU scorer
        inputs = _layer_inputs(d, name, sim, iou("iou")[0], iou("encoder_iou")[0])
        tables = []
        for s in d.scorers:
            # the scores and the null of pseudo-units of this layer (trust module doc); confidence
            # from q and margin until the layer's fidelity replaces it below
            res, d.nulls.setdefault(name, {})[s] = trust.score(s, inputs, d.params[s], iou(s)[1], device=d.device,
                                                                 top=o["top_n"])
            tables.append(S.top_concepts(res, d.vocab.concepts, o["top_n"], vocabulary=d.vocab.name,
                                         encoder=d.enc.id if res.uses_encoder else None,
                                         model=d.target.id, layer=name))
            bar.update()
        if sim is not None and inputs["peak"] is not None:  # held-out fidelity of the layer's explanations; headlines
            fid, head, rows = trust.layer_trust(
                pa.concat_tables(tables).to_pandas(), inputs["peak"], sim, rec.image_ids, cindex, amount,
                nulls=d.nulls[name], dataset=rec.dataset, vocabulary=d.vocab.name, encoder=d.enc.id,
                model=d.target.id, layer=name)
            d.trust_tables.append((fid, head))
            # the calibrated confidence needs the fidelity: it replaces the one from q and margin alone
            conf = np.split(rows["confidence"].to_numpy(np.float32), np.cumsum([t.num_rows for t in tables])[:-1])
            tables = [t.set_column(t.schema.get_field_index("confidence"), "confidence", pa.array(c, pa.float32()))
                      for t, c in zip(tables, conf)]
        for s, rows in zip(d.scorers, tables):
            d.score_tables.append(rows)
            summaries = _summaries(d, name, rows) if o["summarise_with"] == s else None
            d.expl_tables.append(explanations_table(rows, summaries))
    bar.close()


def _layer_inputs(d: _Dissection, layer: str, sim, iou, encoder_iou=None) -> dict:
    """What the scorers (and their nulls) of one layer read; those not computed are None."""
    lr = d.rec.layers[layer]
    idx = np.full(lr.top_idx.shape, -1, np.int64)  # [u, k] box of each unit's r-th top image
    for (l, u, r), box in d.ps.box_of.items():
        if l == layer:
            idx[u, r] = box
    # the layer's own boxes: a unit's patch scores do not depend on the other layers of the run
    patch_emb, unit_patches = S.own_patches(d.patch_emb, torch.from_numpy(idx))   # [p, d], [u, k]
    return {"similarity": sim, "iou_scores": iou, "encoder_iou_scores": encoder_iou, "patch_emb": patch_emb,
            "text_emb": d.text_emb,
            "pooled": torch.from_numpy(lr.pooled_mean.astype(np.float32)) if lr.pooled_mean is not None else None,
            "peak": torch.from_numpy(lr.pooled_max.astype(np.float32)) if lr.pooled_max is not None else None,  # [n, u]
            "unit_patches": unit_patches, "unit_images": torch.from_numpy(lr.top_idx),
            "unit_weights": torch.from_numpy(np.nan_to_num(lr.top_val.astype(np.float32), nan=0.0))}


def _summaries(d: _Dissection, layer: str, rows: pa.Table) -> dict:
    """One LLM sentence per unit of `layer` from its top concepts and top patches."""
    ps, scorer = d.ps, rows["scorer"][0].as_py()
    row_of = {pid: i for i, pid in enumerate(ps.patch_ids)}
    by_unit = {}
    for (l, u, r), pid in ps.assignment.items():
        if l == layer:
            by_unit.setdefault(u, []).append((r, ps.rows[row_of[pid]]["thumbnail"], pid))
    thumbs = _thumbnails(d.store, [p for p in ps.patch_ids if p in d.stored_patches])  # rows cut warm have none
    return summarise(rows, scorer, lambda u: [png or thumbs[pid] for _, png, pid in sorted(by_unit.get(u, []))],
                     log=d.opts["log"])


def _evaluation(d: _Dissection) -> None:
    """The run's explanations against the probe world's truth, written in the same commit."""
    d.evaluation = evaluate_run(d.store, d.target.id, d.rec.dataset, d.target.model_row()["classes"],
                                pa.concat_tables(d.expl_tables), layers_table_rows(d.target, d.layers),
                                pa.concat_tables(d.score_tables))


def _whole_rows(vectors: dict) -> dict:
    """{encoder: (ids, [n, d] array)} of extract_patches' `encoded`, cut to the rows both lists
    hold (an interruption can fall between extending one and the other)."""
    out = {}
    for e, (ids, parts) in vectors.items():
        m = torch.cat(parts).numpy() if parts else np.zeros((0, 0), np.float32)
        n = min(len(ids), len(m))
        out[e] = (list(ids[:n]), m[:n])
    return out


def _with_content_hashes(images: pa.Table, image_ids: Sequence[str], hashes: Sequence[str]) -> pa.Table:
    """The images table with each file's content hash, the key of its vectors in `embeddings`: a
    later reader (find's open vocabulary, trust.assess) finds them without reading the files."""
    of = dict(zip(image_ids, hashes))
    return images.append_column("content_hash", pa.array([of.get(i) for i in images.column("image_id").to_pylist()],
                                                        pa.string()))


def _merged(store: Store, table: str, dataset: str, rows: pa.Table, by: str) -> pa.Table:
    """`rows` of `dataset` and the committed rows of it they do not replace (matched on `by`): a
    write under the dataset's key replaces all of its rows, and a dissect of the first 8 images of
    a folder must not take away the rows of the 12 an earlier one saw, which its activations name."""
    cols = ", ".join(rows.column_names)
    old = store.sql(f"SELECT {cols} FROM {table} WHERE dataset = $d", {"d": dataset})
    keep = pc.invert(pc.is_in(old[by], value_set=rows[by]))
    return pa.concat_tables([old.filter(keep).cast(rows.schema), rows])


def _commit(d: _Dissection, started: float):
    """One run, one commit: every table of the dissect, its concept vectors and its evaluation.
    Write keys at the granularity of the work (module doc). Returns the committed run."""
    target, rec, vocab, enc, ps, source = d.target, d.rec, d.vocab, d.enc, d.ps, d.source
    # untrained models explain nothing: say so wherever the run's results are read
    run_params = {"model": target.spec, "dataset": rec.dataset, "max_images": d.opts["max_images"],
                  "layers": d.layers, "vocabulary": vocab.name, "scorers": d.params, "encoder": enc.id,
                  "k": d.opts["k"], "top_n": d.opts["top_n"], "summarise_with": d.opts["summarise_with"],
                  "random_weights": _random_weights(d),
                  "nulls": {l: {s: n.to_dict() for s, n in v.items()} for l, v in d.nulls.items()}}
    record_key, ds = f"record:{rec.dataset}", rec.dataset
    new_rows = [r for r in ps.rows if r["patch_id"] not in d.stored_patches]
    with d.store.run("dissect", run_params, started_at=started) as run:
        run.write("models", pa.Table.from_pylist([target.model_row()]), key=f"model:{target.id}")
        for row in layers_table_rows(target, d.layers):
            run.write("layers", pa.Table.from_pylist([row]), key=f"{record_key}:{row['layer']}")
        if d.mask_world is not None:  # the world's every image and mask, the same each time
            run.write("images", _with_content_hashes(d.mask_world.images(), rec.image_ids, d.hashes), key=f"images:{ds}")
            run.write("masks", d.mask_world.masks(), key=f"images:{ds}")
            run.write("rejects", source.rejects_table(), key=f"images:{ds}")
        else:  # a folder's images seen by earlier dissects (another --max-images) stay beside this one's
            images = _with_content_hashes(source.images_table(), rec.image_ids, d.hashes)
            run.write("images", _merged(d.store, "images", ds, images, "image_id"), key=f"images:{ds}")
            run.write("rejects", _merged(d.store, "rejects", ds, source.rejects_table(), "path"), key=f"images:{ds}")
        run.write("activations", ps.fill_activations(rec.activations_table()), key=record_key)
        run.write("units", rec.units_table(), key=record_key)
        run.write("pooled", rec.pooled_table(), key=record_key)
        if new_rows:
            pids = [r["patch_id"] for r in new_rows]
            run.write("patches", ps.table(new_rows), key=f"patches:{_ids_key(pids)}")
        if ps.cuts:
            run.write("crops", ps.cuts_table(), key=f"crops:{_ids_key([':'.join(map(str, c[:5])) for c in ps.cuts])}")
        for encoder_id, kind, ids, m in d.new_vectors:
            # a chunk at a time: encoder_iou's windows are read from their spill file as they go
            for at in range(0, len(ids), EMBEDDING_CHUNK):
                part = ids[at:at + EMBEDDING_CHUNK]
                run.write("embeddings", _embedding_rows(encoder_id, kind, part, m[at:at + EMBEDDING_CHUNK]),
                          key=f"emb:{encoder_id}:{kind}:{_ids_key(part)}")
        run.write("vocabularies", vocabulary_table(vocab), key=f"vocab:{vocab.name}")
        run.write("concepts", concepts_table(vocab), key=f"vocab:{vocab.name}")
        for rows, expl in zip(d.score_tables, d.expl_tables):
            s = rows["scorer"][0].as_py() if rows.num_rows else "none"
            key = f"score:{ds}:{s}:{vocab.name}:{enc.id}"
            run.write("scores", rows, key=key)
            run.write("explanations", expl, key=key)
        for fid, head in d.trust_tables:
            run.write("explanation_scores", fid, key=f"trust:{ds}:{vocab.name}:{enc.id}")
            run.write("headlines", head, key=f"trust:{ds}:{vocab.name}:{enc.id}")
        if d.evaluation is not None:
            write_rows(run, d.evaluation.rows)
    d.ckpt.remove()
    if d.evaluation is not None:
        d.evaluation.run_id = run.run_id
    return run


def _random_weights(d: _Dissection) -> dict[str, bool]:
    return {"target": bool(d.target.random_weights), "encoder": bool(getattr(d.enc, "random_weights", False))}


def dissect(store: Store | str | Path, model: str, *, images: str | Path | None = None,
            layers: Sequence[str] | None = None, vocabulary: str | None = None,
            scorers: Sequence[str] | None = None, encoder: str | None = None, k: int = 10,
            top_n: int = 5, batch_size: int = 64, scorer_params: dict | None = None,
            summarise_with: str | None = None, world=None, evaluate: bool = True,
            max_images: int | None = None, device: str = "auto", precision: str = "auto",
            workers: int = 0, checkpoint_every: float = 120.0,
            progress: bool = True, log=print) -> DissectResult:
    """Dissect `layers` of `model` on a folder of images (or the probe world for probe models)
    and write every table of the run to `store` in one commit: scores, explanations, concept
    vectors and (probe world, `evaluate`) the evaluation. Returns a `DissectResult`.

    vocabulary: a vocabulary spec (default: `probe` for probe models, else `english`, 10,000
    common English words).
    scorers: names from `neurostore.scorers.SCORERS` (default: all that apply but the opt-in
    top_images and encoder_iou; `iou` needs per-pixel masks, which only the probe world has). encoder: an
    encoder spec (default: the probe world's encoder for probe models, also with `images`, else
    OpenCLIP ViT-B-32).
    summarise_with: a scorer whose top concepts an LLM turns into one sentence per unit (needs
    ANTHROPIC_API_KEY; without it a template sentence is stored and marked so).

    device/precision: where the models run (`neurostore.devices`); workers: processes decoding
    images. Text, image and crop embeddings already in the store for the encoder are reused, not
    computed again. The pass checkpoints every `checkpoint_every` seconds; the same call after a
    crash resumes from the checkpoint and writes exactly the tables of an uninterrupted run."""
    from .devices import describe, precision_name

    t0 = time.time()
    layers, scorers = listed(layers, "layers"), listed(scorers, "scorers")   # before a store is created
    if not isinstance(store, Store):
        store = Store.open(store)
    d = _plan(store, model, images=images, layers=layers, vocabulary=vocabulary, scorers=scorers,
              encoder=encoder, scorer_params=scorer_params, world=world, device=device, precision=precision,
              opts={"k": k, "top_n": top_n, "batch_size": batch_size, "workers": workers, "images": images,
                    "max_images": max_images, "summarise_with": summarise_with, "checkpoint_every": checkpoint_every,
                    "progress": progress, "log": log})
    lap = _Lap(d.timings)
    stages = [(_vocabulary, "vocabulary"), (_one_pass, "record"), (_patches, "patches"), (_scores, "scores")]
    if evaluate and d.mask_world is not None:
        stages.append((_evaluation, "evaluate"))
    with sigterm_exits():
        for stage, name in stages:
            try:
                stage(d)
            except (KeyboardInterrupt, SystemExit, Exception):
                if d.pass_state is not None:   # the pass has ended: keep it whole, the same command resumes after it
                    log("stopped: saving the image pass (and the crops encoded) to the store's checkpoints/ first")
                    try:
                        d.ckpt.save_ended(d.pass_state, d.patch_vectors)
                    except OSError as e:   # a full disk must not hide why the run stopped
                        log(f"could not save the image pass: {e}")
                raise
            lap(name)
        run = _commit(d, t0)
    lap("store")
    rec, c = d.rec, d.counts
    return DissectResult(
        run_id=run.run_id, model=d.target.id, spec=d.target.spec, dataset=rec.dataset, images=rec.n_images,
        rejects=len(d.source.rejects), layers=d.layers, units=int(sum(rec.layers[l].n_units for l in d.layers)),
        patches=len(d.ps.rows), patch_boxes=d.ps.n_boxes, vocabulary=d.vocab.name, concepts=len(d.vocab),
        scorers=d.scorers, encoder=d.enc.id, random_weights=_random_weights(d), device=describe(d.device),
        precision=precision_name(d.dtype), rows=dict(run.rows), seconds=round(time.time() - t0, 1),
        timings=d.timings,
        passes={"decoded": c["decoded"], "decoded_for_crops": c["decoded_for_crops"],
                "target_passes": c["target_passes"], "encoded_texts": c["texts"],
                "encoded_images": c["images"], "encoded_crops": c["crops"], "encoded_cells": c["cells"]},
        resumed_from=d.resumed, checkpoints=c["checkpoints"], evaluation=d.evaluation)


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
         max_images: int | None = DEMO_MAX_IMAGES, device: str = "auto", precision: str = "auto",
         workers: int = 0, progress: bool = True, log=print) -> DemoResult:
    """Everything on the probe world: build (or reuse) the world, dissect its CNN and ViT on
    several layers with the default scorers and encoder_iou (DEMO_SCORERS), evaluate against the
    truth, and answer three questions."""
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
        runs[name] = dissect(store, f"probe:{name}@{world.root}", world=world, scorers=DEMO_SCORERS,
                             vocabulary="probe", max_images=max_images, device=device,
                             precision=precision, workers=workers, progress=progress, log=log)
    return DemoResult(
        store=str(store.path),
        world={"id": world.id, "root": str(world.root), "config": world.meta["config"],
               "targets": world.summary["targets"], "encoder": world.summary["encoder"]},
        dissections=runs, answers=demo_questions(store, world), seconds=round(time.time() - t0, 1))
