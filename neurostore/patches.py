"""Receptive-field patches: where in each top image a unit fired, cut out, deduplicated.

For every (layer, unit, rank) of a recording, the unit's activation map on that image (kept by
the recorder for its top-k images, or recomputed for them when it did not keep them) is upsampled
bilinearly to the model's input size, and thresholded at a per-map quantile `q` (default 0.95:
the top 5% of the map's pixels). The box is the bounding box of the connected region above the
threshold that contains the unit's peak grid cell, grown around its centre to at least `min_frac` (default
1/4) of the input side so that a vision-language encoder sees some context, then mapped back to
the original image's pixels through the input's crop geometry (`Target.crop_fraction`).

(Network Dissection thresholds with the unit's dataset-wide 0.995 quantile over all positions;
recording keeps no per-position statistics, and the per-map quantile on a unit's *top* images
plays the same role: it selects where the unit fired most on an image where it fired strongly.)

Deduplication: a patch is identified by its content (`patch_id` = 16 hex of a SHA-1 of the
crop's pixels, `crop_id`), so identical crops share one patch and one embedding per encoder,
across units, models and runs. Near-identical boxes share one too: on the same image, a box
whose IoU with an already kept box of its own layer is >= `dedup_iou` (default 0.8) reuses that
patch. Boxes are visited in (layer, unit, rank) order, so the result is deterministic, and a
unit's patches depend on its own layer alone, not on which other layers the run cuts (merged
across layers, a feature layer's box took its source layer's slightly different crop, and 5 of
128 features got another headline beside their source layer than alone). Which patch a box is, once
cut, is kept by content too (the store's `crops` table: image file hash + box -> patch_id), so a
later run finds it without decoding the image again.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from .encoding import SplitPreprocess
from .models import Target
from .progress import bar as progress_bar
from .record import RecordResult, activation_maps

THUMB = 96
BOX_BLOCK = 4096   # maps per boxes_for_maps call: [4096, 64, 64] float32 and its labels, ~130 MB


def crop_id(crop: Image.Image) -> str:
    """A patch's id: 16 hex of the SHA-1 of the crop's size and RGB pixels, so the same crop
    has the same id (and one embedding per encoder) in every run, model and dataset."""
    h = hashlib.sha1(f"{crop.width}x{crop.height}:".encode())
    h.update(crop.tobytes())
    return h.hexdigest()[:16]


def iou(a, b):
    """IoU of box `a` with box `b`, or with each of boxes `b` [m, 4] (x0, y0, x1, y1) -> [m]."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ix = np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
    iy = np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0)
    inter = ix * iy
    union = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


class _Kept:
    """The boxes kept on one image, in order, and the first of them a new box merges into:
    the same box, or IoU >= dedup_iou (`iou` over all kept boxes at once)."""

    def __init__(self):
        self.boxes = np.zeros((0, 4), np.int64)              # [m, 4] x0, y0, x1, y1
        self.items: list = []

    def add(self, box, item) -> None:
        self.boxes = np.vstack([self.boxes, box])
        self.items.append(item)

    def match(self, box, dedup_iou: float):
        """The item of the first kept box `box` merges into, or None."""
        if not self.items:
            return None
        same = (self.boxes == box).all(1) | (iou(box, self.boxes) >= dedup_iou)
        i = int(same.argmax())
        return self.items[i] if same[i] else None


def boxes_for_maps(maps: torch.Tensor, size: int, q: float = 0.95, min_frac: float = 0.25) -> list[tuple]:
    """maps [n, h, w] -> n boxes in input pixels (x0, y0, x1, y1), x1/y1 exclusive."""
    from scipy import ndimage

    n = maps.shape[0]
    if n == 0:
        return []
    if maps.shape[1] * maps.shape[2] == 1:  # a pooled / linear unit: no place, the whole input
        return [(0, 0, size, size)] * n
    # Threshold and label at a working resolution of at most 64 px (boxes to 1/64 of the side:
    # ample for a crop, and labelling 64x64 instead of 224x224 is what keeps this pass cheap).
    full, size = size, min(size, 64)
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear",
                       align_corners=False)[:, 0]            # [n, size, size]
    flat = up.reshape(n, -1)
    kth = max(1, min(flat.shape[1], int(np.ceil(q * flat.shape[1]))))
    # the kth smallest is the last of the (N - kth + 1) largest: a short top-k, far cheaper than kthvalue
    thr = flat.topk(flat.shape[1] - kth + 1, dim=1, sorted=True).values[:, -1]  # [n] per-map quantile q
    # The region kept is the one around the grid cell where the unit peaked (what `loc_y/loc_x`
    # record): bilinear smoothing can lift a near-tie elsewhere above the true peak's pixels.
    h, w = maps.shape[1:]
    cell = maps.reshape(n, -1).argmax(dim=1).numpy()         # [n] flat index in the grid
    cy = np.minimum(((cell // w) + 0.5) * size / h, size - 1).astype(int)
    cx = np.minimum(((cell % w) + 0.5) * size / w, size - 1).astype(int)
    up_peak = flat.argmax(dim=1).numpy()                     # [n] fallback
    mask = (up >= thr[:, None, None]).numpy()                # [n, size, size]
    # Every map's regions in one labelling: 4-connected within a map (scipy's 2-D default), never
    # across maps (labels are unique over the stack).
    within = np.zeros((3, 3, 3), bool)
    within[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(mask, within)                  # [n, size, size]
    rows = np.arange(n)
    off = labels[rows, cy, cx] == 0  # the smoothed peak cell fell under the threshold
    lab = labels[rows, np.where(off, up_peak // size, cy), np.where(off, up_peak % size, cx)]  # [n]
    region = labels == lab[:, None, None]                    # [n, size, size] the peak's region
    ys, xs = region.any(2), region.any(1)                    # [n, size] rows / columns it covers
    y0, y1 = ys.argmax(1), size - ys[:, ::-1].argmax(1)
    x0, x1 = xs.argmax(1), size - xs[:, ::-1].argmax(1)
    min_side = max(1, int(round(min_frac * size)))
    f = full / size
    boxes = []
    for a, b, c, d in zip(x0.tolist(), x1.tolist(), y0.tolist(), y1.tolist()):
        a, b = _grow(a, b, min_side, size)
        c, d = _grow(c, d, min_side, size)
        boxes.append((int(round(a * f)), int(round(c * f)), int(round(b * f)), int(round(d * f))))
    return boxes


def _grow(a: int, b: int, min_side: int, size: int) -> tuple[int, int]:
    """Grow [a, b) around its centre to at least min_side, shifted to stay inside [0, size)."""
    if b - a >= min_side:
        return a, b
    c = (a + b) / 2
    a = int(round(c - min_side / 2))
    a = min(max(a, 0), size - min_side)
    return a, a + min_side


def to_image_box(box, size: int, width: int, height: int, crop_fraction: float | None):
    """A box in model-input pixels -> the same region in the original image's pixels."""
    x0, y0, x1, y1 = box
    if crop_fraction is None:  # the whole image was resized to size x size
        sx, sy, ox, oy = width / size, height / size, 0.0, 0.0
    else:  # resize + centre crop: the input shows a central square of the shorter side
        side = crop_fraction * min(width, height)
        sx = sy = side / size
        ox, oy = (width - side) / 2, (height - side) / 2
    X0 = int(np.clip(np.floor(ox + x0 * sx), 0, width - 1))
    Y0 = int(np.clip(np.floor(oy + y0 * sy), 0, height - 1))
    X1 = int(np.clip(np.ceil(ox + x1 * sx), X0 + 1, width))
    Y1 = int(np.clip(np.ceil(oy + y1 * sy), Y0 + 1, height))
    return X0, Y0, X1, Y1


def thumbnail_png(crop: Image.Image, side: int = THUMB) -> bytes:
    im = crop.copy()
    im.thumbnail((side, side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def cut_before(store, hashes: Sequence[str]) -> dict[tuple, str]:
    """{(image hash, x0, y0, x1, y1): patch_id} of the boxes the store's `crops` table holds for
    these images (by content hash): what `extract_patches(cut=...)` need not cut again."""
    if not hashes or "crops" not in store.tables():
        return {}
    t = store.sql("SELECT c.image_hash, c.x0, c.y0, c.x1, c.y1, any_value(c.patch_id) AS patch_id FROM crops c "
                  "JOIN (SELECT unnest($h) AS image_hash) w USING (image_hash) GROUP BY ALL",
                  {"h": list(dict.fromkeys(hashes))})
    cols = [t.column(c).to_pylist() for c in ("image_hash", "x0", "y0", "x1", "y1")]
    return dict(zip(zip(*cols), t.column("patch_id").to_pylist()))


@dataclass
class PatchSet:
    dataset: str
    rows: list[dict] = field(default_factory=list)           # schema/patches.sql minus run_id
    assignment: dict = field(default_factory=dict)           # (layer, unit, rank) -> patch_id
    # Each box kept on an image (a layer's near-duplicates on the same image merged), in cutting order: the
    # patch population a unit's patches are compared with (identical crops of different images
    # count once per image, as distinct boxes).
    boxes: list = field(default_factory=list)                # patch_id of each kept box
    box_of: dict = field(default_factory=dict)               # (layer, unit, rank) -> index in boxes
    embeddings: dict = field(default_factory=dict)           # encoder id -> (patch ids, [n, dim]) newly encoded
    n_boxes: int = 0                                         # (unit, image) boxes cut
    n_decoded: int = 0                                       # top images decoded for their pixels
    n_encoded: int = 0                                       # crops run through an encoder
    cuts: list = field(default_factory=list)                 # (image hash, x0, y0, x1, y1, patch_id) cut here

    @property
    def patch_ids(self) -> list[str]:
        return [r["patch_id"] for r in self.rows]

    def table(self, rows: list[dict] | None = None) -> pa.Table:
        """schema/patches.sql minus run_id, of `rows` (default: every patch of the set)."""
        rows = self.rows if rows is None else rows
        cols = ("patch_id", "dataset", "image_id", "x0", "y0", "x1", "y1", "thumbnail")
        types = (pa.string(), pa.string(), pa.string(), pa.int32(), pa.int32(), pa.int32(),
                 pa.int32(), pa.binary())
        return pa.table({c: pa.array([r[c] for r in rows], t) for c, t in zip(cols, types)})

    def cuts_table(self) -> pa.Table:
        """schema/crops.sql minus run_id: the boxes this set cut, by image content."""
        cols = ("image_hash", "x0", "y0", "x1", "y1", "patch_id")
        types = (pa.string(), pa.int32(), pa.int32(), pa.int32(), pa.int32(), pa.string())
        return pa.table({c: pa.array([r[i] for r in self.cuts], t) for i, (c, t) in enumerate(zip(cols, types))})

    def fill_activations(self, activations: pa.Table) -> pa.Table:
        """The activations table with patch_id filled from this set."""
        layers = activations.column("layer").to_pylist()
        units = activations.column("unit").to_pylist()
        ranks = activations.column("rank").to_pylist()
        ids = [self.assignment.get((l, u, r)) for l, u, r in zip(layers, units, ranks)]
        i = activations.column_names.index("patch_id")
        return activations.set_column(i, "patch_id", pa.array(ids, pa.string()))

    def crops(self, source) -> list[Image.Image]:
        """The crops as RGB PIL images, in `rows` order (each image loaded once)."""
        out: list[Image.Image | None] = [None] * len(self.rows)
        by_image = defaultdict(list)
        for i, r in enumerate(self.rows):
            by_image[r["image_id"]].append(i)
        for image_id, idx in by_image.items():
            im = source.load(image_id)
            for i in idx:
                r = self.rows[i]
                out[i] = im.crop((r["x0"], r["y0"], r["x1"], r["y1"]))
        return out


@dataclass
class _Cutter:
    """The pixel work of one top image: decode it (the first time a box needs pixels), cut each
    of its boxes, hash the crop, make its thumbnail and each encoder's input. What all images
    share is here; an image's own boxes and cut-before entries come with its call."""

    source: object                    # .load(image_id) -> RGB image
    size: int                         # the target's input side (boxes are in its pixels)
    crop_fraction: float | None       # the target's crop geometry (to_image_box)
    dedup_iou: float
    known: dict                       # encoder id -> patch ids it has embedded
    stored: frozenset                 # patch ids the store holds (their rows need no thumbnail)
    to_pixels: dict                   # encoder id -> crop -> its input
    sizes: dict                       # image id -> (width, height) where known without decoding

    def __call__(self, iid: str, h: str | None, img, todo: list, cut: dict) -> tuple[list, int]:
        """`todo`: [(job, box in input pixels)] in cutting order; `cut`: {image box: patch_id} of
        boxes of this image cut before. Returns ("dup", job, patch id, index of the kept box) for
        a box merged into an earlier box of its layer on the image, ("new", job, patch id, box,
        cut row or None, thumbnail or None, [(encoder id, its input)] for the encoders that lack
        the crop); and how many times the image was decoded (0 or 1)."""
        decoded = 0

        def image():  # the decoded image, loaded the first time a box needs pixels
            nonlocal img, decoded
            if img is None:
                img, decoded = self.source.load(iid), decoded + 1
            return img

        W, H = self.sizes[iid] if img is None and iid in self.sizes else image().size
        kept = defaultdict(_Kept)                                # layer -> the boxes kept on this image
        out, n_kept = [], 0                                      # n_kept: the image's boxes, all layers
        for job, box in todo:
            ibox = to_image_box(box, self.size, W, H, self.crop_fraction)
            pid, kb = kept[job[0]].match(ibox, self.dedup_iou) or (None, None)
            if pid is not None:
                out.append(("dup", job, pid, kb))
                continue
            crop, row = None, None
            pid = cut.get(ibox)
            if pid is None:  # never cut: cut and hash it
                crop = image().crop(ibox)
                pid = crop_id(crop)
                row = (h, *ibox, pid) if h is not None else None
            kept[job[0]].add(ibox, (pid, n_kept))
            n_kept += 1
            encode = [e for e in self.to_pixels if pid not in self.known[e]]
            thumb = pid not in self.stored
            if crop is None and (encode or thumb):
                crop = image().crop(ibox)
            out.append(("new", job, pid, ibox, row, thumbnail_png(crop) if thumb else None,
                        [(e, self.to_pixels[e](crop)) for e in encode]))
        return out, decoded


_CUTTER: dict = {}  # the _Cutter of the running extract_patches, which forked workers inherit


def _cut_in_worker(*args):
    return _CUTTER["cutter"](*args)


def _pool(workers: int, cutter: _Cutter):
    """(executor, the function it runs) for `workers` > 1: forked processes, which inherit the
    cutter (its known and stored ids can be millions) rather than receive it; threads where the
    platform cannot fork. (None, cutter) otherwise."""
    if workers <= 1:
        return None, cutter
    if "fork" not in multiprocessing.get_all_start_methods():
        return ThreadPoolExecutor(workers), cutter
    _CUTTER["cutter"] = cutter
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")), _cut_in_worker


def extract_patches(target: Target, result: RecordResult, source, layers: Sequence[str] | None = None,
                    q: float = 0.95, min_frac: float = 0.25, dedup_iou: float = 0.8,
                    batch_size: int = 32, encoders: Sequence = (), known: dict | None = None,
                    stored: frozenset = frozenset(), hashes: Sequence[str] | None = None,
                    cut: dict | None = None, progress: bool = True, workers: int = 0,
                    encoded: dict | None = None, on_chunk: Callable[[], object] | None = None) -> PatchSet:
    """Cut the receptive-field patch of every (layer, unit, top image) of `result`.

    Boxes come from the maps the recorder kept for each unit's top images (`keep_maps=True`);
    without them the maps of the top images are recomputed (a second, light model pass). A top
    image is decoded again for its pixels (`PatchSet.n_decoded`) only when one of its boxes needs
    them: `source.load(image_id)` must return the RGB image (ImageSource does). When `encoders` are
    given, each unique crop is embedded once per encoder as it is cut, except the patch ids in
    `known[encoder.id]` (already in the store); `PatchSet.embeddings[encoder.id]` is then (patch
    ids, [n, dim]). Rows of the patch ids in `stored` (already in the store's patches table) get
    no thumbnail (None): a warm run does not re-encode what it will not write.

    `hashes`: the content hash of each of `result`'s images (`images.file_hash`, recorder order);
    `cut`: {(image hash, x0, y0, x1, y1): patch_id} of boxes cut before (the store's `crops`
    table). A box found there is not cut and hashed again; an image all of whose boxes are found,
    stored and encoded is not decoded at all (its size comes from `source.sizes`). Boxes cut here
    are listed in `PatchSet.cuts` (the rows of schema/crops.sql). Keys are the file's content:
    a changed file has another hash, and its crops are cut anew.

    `encoded`: {encoder id: ([patch ids], [[b, dim] vectors])}, extended a batch at a time as
    crops are encoded (ids first: a reader keeps the rows both name), so that a caller keeps what
    an interrupted cut encoded (`on_chunk`, called after each chunk of images, can save it); what
    it holds on entry is part of the result's embeddings."""
    layers = list(layers or result.layers)
    known = known or {}
    cut = dict(cut or {})
    kept_maps = all(result.layers[n].top_maps is not None for n in layers)
    # Which (layer, unit, rank) need each image: image index -> list of jobs.
    jobs: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
    for name in layers:
        lr = result.layers[name]
        for u, r in zip(*np.nonzero(lr.top_idx >= 0)):
            jobs[int(lr.top_idx[u, r])].append((name, int(u), int(r)))
    order = sorted(jobs)
    ps = PatchSet(result.dataset)
    seen: set[str] = set()                                         # patch ids cut in this set
    pending: dict[str, list] = {enc.id: [] for enc in encoders}    # (patch id, encoder input) to encode
    encoded = encoded if encoded is not None else {}
    for enc in encoders:
        encoded.setdefault(enc.id, ([], []))
    sizes = getattr(source, "sizes", {})
    bar = progress_bar(len(order), "patches", "img", progress)

    # crops go to the encoder as uint8 and are normalised a batch at a time on its device, where
    # its preprocessing has the usual form (SplitPreprocess); else crop by crop
    split = {enc.id: enc.split_preprocess() if hasattr(enc, "split_preprocess") else SplitPreprocess.of(enc.preprocess)
             for enc in encoders}
    to_pixels = {enc.id: split[enc.id].pixels if split[enc.id] else enc.preprocess for enc in encoders}

    def flush(force=False):
        for enc in encoders:
            buf = pending[enc.id]
            while buf and (force or len(buf) >= batch_size):
                chunk, pending[enc.id] = buf[:batch_size], buf[batch_size:]
                buf = pending[enc.id]
                xs = [x for _, x in chunk]
                x = (split[enc.id].batch(xs, getattr(enc, "device", "cpu")) if split[enc.id] is not None
                     else torch.stack(xs))                                 # [b, 3, S, S]
                v = enc.encode_images(x).float().cpu()                    # [b, dim]
                ids, parts = encoded[enc.id]
                ids.extend(pid for pid, _ in chunk)
                parts.append(v)
                ps.n_encoded += len(chunk)

    S = target.input_size
    # The boxes depend on the maps alone: a whole layer's at once, here (batched torch ops; the
    # pixel workers below run PIL, zlib, hashlib and numpy only). Each map's box is its own
    # (boxes_for_maps).
    box_of: dict[tuple[str, int, int], tuple] = {}

    def add_boxes(name: str, keys: list, maps: torch.Tensor) -> None:   # maps [n, h, w]
        for c0 in range(0, len(keys), BOX_BLOCK):
            box_of.update(zip(keys[c0 : c0 + BOX_BLOCK], boxes_for_maps(maps[c0 : c0 + BOX_BLOCK], S, q, min_frac)))

    if kept_maps:
        for name in layers:
            lr = result.layers[name]
            us, rs = np.nonzero(lr.top_idx >= 0)
            add_boxes(name, [(name, int(u), int(r)) for u, r in zip(us, rs)], torch.from_numpy(lr.top_maps[us, rs]))

    # The pixel work of an image (decode, cutting, crop hashing, thumbnail, the encoders'
    # preprocessing: _Cutter) runs in `workers` processes, a chunk of images ahead of the
    # bookkeeping, which stays in order in this thread (so the result does not depend on the
    # workers) and feeds the encoder meanwhile. Processes, not threads: under one GIL the threads
    # cut ~140 top images/s however many there were (14 on the GPU machine). (A few images per
    # worker at a time: their preprocessed crops wait in memory for the encoder.)
    step = batch_size if workers <= 1 else 4 * workers
    cutter = _Cutter(source, S, target.crop_fraction, dedup_iou, {e: known.get(e, frozenset()) for e in to_pixels},
                     stored, to_pixels, sizes)
    pool, run = _pool(workers, cutter)
    by_hash: dict[str, dict] = defaultdict(dict)                 # image hash -> {box: patch_id} cut before
    for (h, *box), pid in cut.items():
        by_hash[h][tuple(box)] = pid

    def launch(idx: list[int]) -> tuple[list, list | None]:
        """Start a chunk of images: its boxes (from recomputed maps where none were kept), then
        its pixel work in the pool (None without a pool: done in order as it is read)."""
        ids = [result.image_ids[i] for i in idx]
        pils: list = [None] * len(idx)
        if not kept_maps:
            pils = [source.load(iid) for iid in ids]
            ps.n_decoded += len(pils)
            pixels = torch.stack([target.preprocess(im) for im in pils])  # [b, 3, S, S]
            maps = activation_maps(target, layers, pixels)                 # layer -> [b, units, h, w]
            for j, i in enumerate(idx):
                for name in layers:
                    mine = [job for job in jobs[i] if job[0] == name]
                    if mine:
                        add_boxes(name, mine, maps[name][j, [u for _, u, _ in mine]])
        args = []
        for j, (i, iid) in enumerate(zip(idx, ids)):
            h = hashes[i] if hashes is not None else None
            todo = [(job, box_of[job]) for name in layers for job in jobs[i] if job[0] == name]  # layer by layer
            args.append((iid, h, pils[j], todo, by_hash.get(h, {})))
        return args, [pool.submit(run, *a) for a in args] if pool else None

    try:
        chunks = [order[c : c + step] for c in range(0, len(order), step)]
        ahead = launch(chunks[0]) if chunks else None
        for c, idx in enumerate(chunks):
            args, futures = ahead
            ahead = launch(chunks[c + 1]) if c + 1 < len(chunks) else None   # the pool cuts the next chunk meanwhile
            done = (f.result() for f in futures) if futures is not None else (cutter(*a) for a in args)
            for (iid, *_), (out, decoded) in zip(args, done):
                ps.n_decoded += decoded
                first = len(ps.boxes)  # the image's boxes are numbered from here
                for kind, (l, u, r), pid, *rest in out:
                    ps.n_boxes += 1
                    if kind == "dup":
                        ps.box_of[(l, u, r)] = first + rest[0]
                    else:
                        ibox, row, thumb, pre = rest
                        if row is not None and row[:5] not in cut:  # (a duplicate file cuts it once)
                            cut[row[:5]] = pid
                            ps.cuts.append(row)
                        ps.boxes.append(pid)
                        if pid not in seen:  # identical crops (of any image) are one patch
                            seen.add(pid)
                            ps.rows.append({"patch_id": pid, "dataset": result.dataset, "image_id": iid,
                                            "x0": ibox[0], "y0": ibox[1], "x1": ibox[2], "y1": ibox[3],
                                            "thumbnail": None if pid in stored else thumb})
                            for e, x in pre:  # the encoders that do not know this crop, its input
                                pending[e].append((pid, x))
                    ps.assignment[(l, u, r)] = pid
                    ps.box_of.setdefault((l, u, r), len(ps.boxes) - 1)
                flush()
            flush()
            bar.update(len(idx))
            if on_chunk is not None:
                on_chunk()
        flush(force=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
            _CUTTER.clear()
    bar.close()
    for enc in encoders:
        ids, parts = encoded[enc.id]
        ps.embeddings[enc.id] = (list(ids), torch.cat(parts).numpy() if parts
                                 else np.zeros((0, enc.dim), np.float32))
    return ps


@torch.no_grad()
def embed_patches(crops: Sequence[Image.Image], encoder, batch_size: int = 64) -> np.ndarray:
    """Unique patch crops -> [n_patches, dim] float32 unit rows, in batches."""
    if not crops:
        return np.zeros((0, encoder.dim), np.float32)
    out = []
    for i in range(0, len(crops), batch_size):
        batch = torch.stack([encoder.preprocess(c) for c in crops[i : i + batch_size]])
        out.append(encoder.encode_images(batch).float())
    return torch.cat(out).numpy()
