"""The recorder: hooks on named layers, streaming top-k per unit, pooled activations, statistics.

    target = load_target("torchvision:resnet18@random", input_size=128)
    result = record(target, ["layer3", "layer4"], ImageFolder("photos/"), k=10, batch_size=64)
    result.activations_table()    # schema/activations.sql minus run_id (patch_id empty)
    result.units_table()          # schema/units.sql minus run_id
    result.pooled_table()         # schema/pooled.sql minus run_id
    result.layers["layer4"].pooled_max   # [n_images, units] float16, for the scorers

Units: a conv layer's channels; a linear layer's neurons; a token layer's channels, with the patch
tokens reshaped to the spatial grid (prefix tokens such as CLS are dropped), so a ViT MLP neuron
has a map over image patches like a conv channel.

Per image and unit, the map is reduced as it leaves the hook: spatial max (the value ranked by
top-k and summarised in `units`), its location, and the spatial mean. With `keep_maps=True` the
recorder also keeps, for each unit, its grid-size map on each of its current top-k images
([units, k, h, w] per layer, replaced as better images arrive), so patch boxes need no second
pass; `on_maps(layer, map)` lets another consumer (the IoU thresholds) see each full batch map.

Memory is bounded by the batch size and the per-unit state (top-k values and, with keep_maps,
k grid maps per unit), plus the outputs that grow with the probe set by design: the pooled
matrices (2 x float16 x units per image and layer; `pooled=False` drops them) and the image id
list. `state_dict()`/`load_state_dict()` checkpoint all of it, so a recording can resume.

Statistics: mean, std, max and fraction active (spatial max > 0) are exact running sums. The
quantiles and histogram come from a uniform reservoir sample of `reservoir` images (default
4096; the same images for every unit and layer): exact when the probe set is no larger, a
sample beyond. Histogram edges span the exact min..max; counts are counts in the sample.

Shards: a `Recorder` over a different image range merges into another with `merge()` (top-k by
value, sums added, pooled rows appended, reservoirs combined by weighted sampling), so recording
can be split by image range and combined later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from .devices import autocast
from .errors import UnknownLayer
from .hooks import forward_hooks
from .models import Target, list_layers, resolve_layer, token_grid

N_HIST_BINS = 32


# ---- hooks ------------------------------------------------------------------------------------


def to_map(target: Target, out: torch.Tensor) -> torch.Tensor:
    """A captured layer output -> [batch, units, h, w] (a view when possible)."""
    if out.dim() == 4:
        return out  # [batch, units, h, w]
    if out.dim() == 2:
        return out[:, :, None, None]  # [batch, units, 1, 1]
    if out.dim() == 3:
        x = out.transpose(0, 1) if target.token_layout == "tbc" else out  # [batch, tokens, units]
        prefix, gh, gw = token_grid(target, x.shape[1])
        x = x[:, prefix:, :]  # [batch, gh*gw, units]: patch tokens only
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)  # [batch, units, gh, gw]
    raise ValueError(f"cannot map an output of shape {tuple(out.shape)} to units")


def hooks(target: Target, layers: Sequence[str], fn):
    """Forward hooks calling fn(layer, map [batch, units, h, w]) on each named layer, for a
    `with` block (neurostore.hooks.forward_hooks: every handle removed on exit)."""
    def reader(layer):
        def read(out):
            fn(layer, to_map(target, out.detach()))  # returns None: the output goes on unchanged
        return read
    return forward_hooks(target.module, {layer: reader(layer) for layer in layers})


@torch.no_grad()
def activation_maps(target: Target, layers: Sequence[str], pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Full activation maps of a few images: layer -> [batch, units, h, w] float32."""
    maps: dict[str, torch.Tensor] = {}

    def keep(layer, m):
        maps[layer] = m.float().contiguous()  # [batch, units, h, w]

    with hooks(target, layers, keep):
        target.module(pixels.to(getattr(target, "device", None) or "cpu"))
    return maps


# ---- per-layer running state -------------------------------------------------------------------


class LayerState:
    """Running top-k, pooled rows and sums of one layer."""

    def __init__(self, n_units: int, grid: tuple[int, int], k: int, reservoir: int, pooled: bool,
                 keep_maps: bool = False, device: torch.device | str = "cpu"):
        self.n_units, self.grid, self.k, self.pooled = n_units, grid, k, pooled
        U = n_units
        self.top_val = torch.full((U, k), -float("inf"), device=device)    # [units, k] spatial max
        self.top_idx = torch.full((U, k), -1, dtype=torch.long, device=device)  # [units, k] image index
        self.top_loc = torch.zeros((U, k), dtype=torch.long, device=device)   # [units, k] flat grid index
        self.top_mean = torch.zeros((U, k), device=device)                  # [units, k] spatial mean
        # [units, k, h, w] each unit's map on each of its top-k images (for the patch boxes)
        self.top_maps = torch.zeros((U, k, *grid), device=device) if keep_maps else None
        self.sum = np.zeros(U, np.float64)
        self.sumsq = np.zeros(U, np.float64)
        self.n_active = np.zeros(U, np.int64)
        self.vmax = np.full(U, -np.inf, np.float64)
        self.vmin = np.full(U, np.inf, np.float64)
        self.res = np.zeros((reservoir, U), np.float32)      # [reservoir, units] sample of maxima
        self.mean_chunks: list[np.ndarray] = []              # [b, units] float16 each
        self.max_chunks: list[np.ndarray] = []

    def update(self, offset: int, vmax: torch.Tensor, loc: torch.Tensor, vmean: torch.Tensor,
               res_rows: np.ndarray, res_slots: np.ndarray, maps: torch.Tensor | None = None) -> None:
        """Fold one batch: vmax/loc/vmean are [batch, units]; image indices offset..offset+b;
        maps [batch, units, h, w] when keep_maps."""
        b = vmax.shape[0]
        idx = torch.arange(offset, offset + b, device=vmax.device).expand(self.n_units, b)  # [units, b]
        val = torch.cat([self.top_val, vmax.T], 1)           # [units, k + b]
        best, pos = val.topk(min(self.k, val.shape[1]), dim=1)
        if self.top_maps is not None:
            # Slot pos < k keeps an old map, pos >= k takes the batch's image pos - k.
            k = self.top_maps.shape[1]
            units = torch.arange(self.n_units, device=pos.device)[:, None].expand_as(pos)
            old = self.top_maps[units, pos.clamp(max=k - 1)]                  # [units, k, h, w]
            new = maps.float().transpose(0, 1)[units, (pos - k).clamp(min=0)]  # [units, k, h, w]
            self.top_maps = torch.where((pos >= k)[..., None, None], new, old)
        self.top_val = best
        self.top_idx = torch.cat([self.top_idx, idx], 1).gather(1, pos)
        self.top_loc = torch.cat([self.top_loc, loc.T], 1).gather(1, pos)
        self.top_mean = torch.cat([self.top_mean, vmean.T], 1).gather(1, pos)
        vmax, vmean = vmax.cpu(), vmean.cpu()
        v = vmax.double().numpy()                            # [b, units]
        self.sum += v.sum(0)
        self.sumsq += (v * v).sum(0)
        self.n_active += (v > 0).sum(0)
        self.vmax = np.maximum(self.vmax, v.max(0))
        self.vmin = np.minimum(self.vmin, v.min(0))
        if len(res_slots):
            self.res[res_slots] = v[res_rows]
        if self.pooled:
            self.mean_chunks.append(vmean.numpy().astype(np.float16))
            self.max_chunks.append(vmax.numpy().astype(np.float16))

    def merge(self, other: "LayerState", offset: int, n_self: int, n_other: int,
              rng: np.random.Generator) -> None:
        """Fold another shard whose image indices start at `offset` in the merged order."""
        val = torch.cat([self.top_val, other.top_val], 1)
        best, pos = val.topk(self.k, dim=1)
        other_idx = torch.where(other.top_idx >= 0, other.top_idx + offset, other.top_idx)
        if self.top_maps is not None and other.top_maps is not None:  # the maps follow their images
            maps = torch.cat([self.top_maps, other.top_maps], 1)            # [units, 2k, h, w]
            self.top_maps = maps[torch.arange(self.n_units, device=pos.device)[:, None], pos]  # [units, k, h, w]
        self.top_idx = torch.cat([self.top_idx, other_idx], 1).gather(1, pos)
        self.top_loc = torch.cat([self.top_loc, other.top_loc], 1).gather(1, pos)
        self.top_mean = torch.cat([self.top_mean, other.top_mean], 1).gather(1, pos)
        self.top_val = best
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.n_active += other.n_active
        self.vmax = np.maximum(self.vmax, other.vmax)
        self.vmin = np.minimum(self.vmin, other.vmin)
        R = self.res.shape[0]
        a, b = self.res[: min(n_self, R)], other.res[: min(n_other, R)]
        if len(a) + len(b) <= R:
            self.res[: len(a) + len(b)] = np.concatenate([a, b])
        else:
            # Each shard's reservoir stands for its n images: draw rows in proportion.
            take_a = int(rng.binomial(R, n_self / (n_self + n_other)))
            take_a = min(max(take_a, R - len(b)), len(a))
            rows_a = rng.choice(len(a), take_a, replace=False)
            rows_b = rng.choice(len(b), R - take_a, replace=False)
            self.res[:] = np.concatenate([a[rows_a], b[rows_b]])
        self.mean_chunks += other.mean_chunks
        self.max_chunks += other.max_chunks


@dataclass
class LayerResult:
    layer: str
    n_units: int
    grid_h: int
    grid_w: int
    top_idx: np.ndarray      # [units, k] image index (-1 where fewer than k images)
    top_val: np.ndarray      # [units, k] spatial max, descending
    top_mean: np.ndarray     # [units, k] spatial mean on that image
    loc_y: np.ndarray        # [units, k] row of the max in the grid
    loc_x: np.ndarray        # [units, k] column of the max in the grid
    pooled_mean: np.ndarray | None  # [n_images, units] float16
    pooled_max: np.ndarray | None   # [n_images, units] float16
    stats: dict              # per unit arrays: act_mean, act_std, act_max, frac_active, q50, q90, q99,
                             # hist_edges [units, bins+1], hist_counts [units, bins]
    top_maps: np.ndarray | None = None  # [units, k, h, w] map on each top image (keep_maps)


@dataclass
class RecordResult:
    model: str
    dataset: str
    image_ids: list[str]
    layers: dict[str, LayerResult]
    rejects: list[dict]

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def activations_table(self) -> pa.Table:
        """schema/activations.sql minus run_id; patch_id is null until patches are cut, act_map
        (`map_cells` of the unit's map on the image) null unless the recorder kept maps."""
        cols = {c: [] for c in ("unit", "rank", "image_id", "act_value", "act_mean", "loc_y",
                                "loc_x", "layer")}
        maps: list = []  # per layer: [rows, h', w'] int8 cells, or Nones
        for lr in self.layers.values():
            units, ranks = np.nonzero(lr.top_idx >= 0)
            cols["unit"].append(units)
            cols["rank"].append(ranks)
            cols["image_id"].append(np.asarray(self.image_ids, dtype=object)[lr.top_idx[units, ranks]]
                                    if len(units) else np.zeros(0, object))
            cols["act_value"].append(lr.top_val[units, ranks])
            cols["act_mean"].append(lr.top_mean[units, ranks])
            cols["loc_y"].append(lr.loc_y[units, ranks])
            cols["loc_x"].append(lr.loc_x[units, ranks])
            cols["layer"].append(np.full(len(units), lr.layer, dtype=object))
            spatial = lr.top_maps is not None and lr.grid_h * lr.grid_w > 1 and len(units)
            maps.append(map_cells(lr.top_maps[units, ranks]) if spatial else [None] * len(units))
        cat = {c: (np.concatenate(v) if v else np.zeros(0)) for c, v in cols.items()}
        n = len(cat["unit"])
        return pa.table({
            "unit": pa.array(cat["unit"], pa.int32()),
            "rank": pa.array(cat["rank"], pa.int32()),
            "dataset": pa.array([self.dataset] * n, pa.string()),
            "image_id": pa.array(list(cat["image_id"]), pa.string()),
            "act_value": pa.array(cat["act_value"], pa.float32()),
            "act_mean": pa.array(cat["act_mean"], pa.float32()),
            "loc_y": pa.array(cat["loc_y"], pa.int32()),
            "loc_x": pa.array(cat["loc_x"], pa.int32()),
            "act_map": pa.concat_arrays([_map_array(m) for m in maps]) if maps else pa.array([], MAP_TYPE),
            "patch_id": pa.array([None] * n, pa.string()),
            "model": pa.array([self.model] * n, pa.string()),
            "layer": pa.array(list(cat["layer"]), pa.string()),
        })

    def units_table(self) -> pa.Table:
        """schema/units.sql minus run_id."""
        parts = []
        for lr in self.layers.values():
            s, U = lr.stats, lr.n_units
            edges = s["hist_edges"].astype(np.float32)
            counts = s["hist_counts"].astype(np.int32)
            parts.append(pa.table({
                "unit": pa.array(np.arange(U), pa.int32()),
                "dataset": pa.array([self.dataset] * U, pa.string()),
                "n_images": pa.array(np.full(U, self.n_images), pa.int32()),
                **{c: pa.array(s[c], pa.float32()) for c in
                   ("act_mean", "act_std", "act_max", "frac_active", "q50", "q90", "q99")},
                "hist_edges": _list_array(edges, pa.float32()),
                "hist_counts": _list_array(counts, pa.int32()),
                "model": pa.array([self.model] * U, pa.string()),
                "layer": pa.array([lr.layer] * U, pa.string()),
            }))
        return pa.concat_tables(parts) if parts else pa.table({})

    def pooled_table(self) -> pa.Table:
        """schema/pooled.sql minus run_id: one row per (layer, image), units as float lists."""
        from concurrent.futures import ThreadPoolExecutor

        layers = [lr for lr in self.layers.values() if lr.pooled_mean is not None]
        if not layers:
            return pa.table({})
        # float16 -> float32 a matrix at a time in threads (numpy's cast releases the GIL): at
        # 50,000 images x 3,904 units, 1.56 GB that one thread converted in 2.9 s (bench/store_write.py)
        mats = [m for lr in layers for m in (lr.pooled_mean, lr.pooled_max)]
        with ThreadPoolExecutor(min(len(mats), os.cpu_count() or 1)) as pool:
            lists = list(pool.map(lambda m: _list_array(m.astype(np.float32), pa.float32()), mats))
        ids = pa.array(self.image_ids, pa.string())
        parts = []
        for i, lr in enumerate(layers):
            n = lr.pooled_mean.shape[0]
            parts.append(pa.table({
                "dataset": pa.array([self.dataset] * n, pa.string()),
                "image_id": ids,
                "act_mean": lists[2 * i],
                "act_max": lists[2 * i + 1],
                "model": pa.array([self.model] * n, pa.string()),
                "layer": pa.array([lr.layer] * n, pa.string()),
            }))
        return pa.concat_tables(parts)

    def rejects_table(self) -> pa.Table:
        """schema/rejects.sql minus run_id."""
        return pa.table({c: pa.array([r[c] for r in self.rejects], pa.string())
                         for c in ("dataset", "path", "reason")})


MAP_CELLS = 16  # the stored map's longer side, at most (schema/activations.sql act_map)
MAP_TYPE = pa.list_(pa.list_(pa.int8()))


def map_cells(maps: np.ndarray, side: int = MAP_CELLS) -> np.ndarray:
    """[n, h, w] activation maps -> [n, h', w'] int8, each map area-downsampled to at most `side`
    cells on its longer side (aspect kept) and scaled to 0..100 between its own min and max (a
    flat map is all 0): where on the image the unit fired, small enough to keep for every top image."""
    n, h, w = maps.shape
    f = min(1.0, side / max(h, w))
    size = (max(1, round(h * f)), max(1, round(w * f)))
    x = torch.as_tensor(maps, dtype=torch.float32)[:, None]        # [n, 1, h, w]
    if size != (h, w):
        x = torch.nn.functional.adaptive_avg_pool2d(x, size)      # [n, 1, h', w'] cell means
    x = x[:, 0]                                                     # [n, h', w']
    lo = x.amin(dim=(1, 2), keepdim=True)
    span = x.amax(dim=(1, 2), keepdim=True) - lo
    x = torch.where(span > 0, (x - lo) / span.clamp(min=1e-12), torch.zeros_like(x))
    return (x * 100).round().to(torch.int8).numpy()


def _map_array(cells) -> pa.Array:
    """[rows, h, w] int8 cells (or a list of Nones) -> Arrow list<list<int8>>, one map per row."""
    if isinstance(cells, list):
        return pa.nulls(len(cells), MAP_TYPE)
    return _list_array(cells, pa.int8())


def _list_array(matrix: np.ndarray, typ) -> pa.Array:
    """[rows, width] matrix -> Arrow list array (one list per row), without Python loops; an
    array of more dimensions nests (e.g. [rows, h, w] -> list<list<typ>>, one h x w list per row)."""
    rows, width = matrix.shape[:2]
    offsets = pa.array(np.arange(0, (rows + 1) * width, width, dtype=np.int32) if rows else [0],
                       pa.int32())
    values = (_list_array(matrix.reshape(rows * width, *matrix.shape[2:]), typ) if matrix.ndim > 2
              else pa.array(matrix.reshape(-1), typ))
    return pa.ListArray.from_arrays(offsets, values)


# ---- the recorder -------------------------------------------------------------------------------


class Recorder:
    """Streaming recorder over named layers of a target.

        with Recorder(target, layers, k=10, dataset="photos-1a2b3c4d") as rec:
            for batch in source.batches(target.preprocess, 64):
                rec.update(batch.image_ids, batch.pixels)
        result = rec.result()
    """

    def __init__(self, target: Target, layers: Sequence[str], k: int = 10, dataset: str = "images",
                 pooled: bool = True, reservoir: int = 4096, seed: int = 0, keep_maps: bool = False,
                 on_maps=None, precision: "torch.dtype | None" = None):
        self.target, self.k, self.dataset = target, int(k), dataset
        self.device = torch.device(getattr(target, "device", None) or "cpu")
        self.layer_names = list(dict.fromkeys(resolve_layer(target, name) for name in layers))
        infos = {li.layer: li for li in list_layers(target)}
        self.states: dict[str, LayerState] = {}
        for name in self.layer_names:
            li = infos.get(name)
            if li is None:
                raise UnknownLayer(f"Layer '{name}' of {target.id} gives no tensor output to record. "
                                   f"See 'neurostore layers {target.spec}'.")
            self.states[name] = LayerState(li.n_units, (li.grid_h, li.grid_w), self.k, reservoir, pooled,
                                           keep_maps, self.device)
        self.reservoir = reservoir
        self.rng = np.random.default_rng(seed)
        self.image_ids: list[str] = []
        self.rejects: list[dict] = []
        self._reduced: dict[str, tuple] = {}
        self._stack = None
        self.keep_maps, self.on_maps, self.precision = keep_maps, on_maps, precision

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(hooks(self.target, self.layer_names, self._hook))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        self._stack = None
        return False

    def _hook(self, layer: str, m: torch.Tensor) -> None:
        if self.on_maps is not None:
            self.on_maps(layer, m)                           # [batch, units, h, w]
        flat = m.flatten(2).float()                          # [batch, units, h*w]
        vmax, loc = flat.max(dim=2)                          # [batch, units] each
        # The map is kept only for the top-k update (keep_maps), then dropped with the batch.
        self._reduced[layer] = (vmax, loc, flat.mean(dim=2), m if self.keep_maps else None)

    def _reservoir_slots(self, offset: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Algorithm R for images offset..offset+b-1: (batch rows, reservoir slots) to write."""
        t = np.arange(offset, offset + b)
        slots = np.where(t < self.reservoir, t, self.rng.integers(0, t + 1))
        keep = slots < self.reservoir
        return np.nonzero(keep)[0], slots[keep]

    @torch.no_grad()
    def update(self, image_ids: Sequence[str], pixels: torch.Tensor) -> None:
        """Run one batch [b, 3, S, S] through the model and fold it in."""
        if self._stack is None:
            with self:
                return self.update(image_ids, pixels)
        b = pixels.shape[0]
        if b == 0:
            return

        self._reduced.clear()
        with autocast(self.device, self.precision):
            self.target.module(pixels.to(self.device, non_blocking=True))
        offset = len(self.image_ids)
        rows, slots = self._reservoir_slots(offset, b)
        for name, state in self.states.items():
            vmax, loc, vmean, maps = self._reduced[name]
            state.update(offset, vmax, loc, vmean, rows, slots, maps)
        self._reduced.clear()
        self.image_ids.extend(image_ids)

    def state_dict(self) -> dict:
        """Everything the recording has folded so far (CPU copies), for a checkpoint."""
        def cpu(v):
            return v.cpu() if isinstance(v, torch.Tensor) else v
        return {"image_ids": list(self.image_ids), "rejects": list(self.rejects),
                "rng": self.rng.bit_generator.state,
                "states": {n: {a: cpu(v) for a, v in vars(st).items()} for n, st in self.states.items()}}

    def load_state_dict(self, d: dict) -> None:
        """Continue from `state_dict()` of a recorder of the same target, layers and k."""
        self.image_ids, self.rejects = list(d["image_ids"]), list(d["rejects"])
        self.rng.bit_generator.state = d["rng"]
        for n, st in self.states.items():
            for a, v in d["states"][n].items():
                setattr(st, a, v.to(self.device) if isinstance(v, torch.Tensor) else v)

    def merge(self, other: "Recorder") -> "Recorder":
        """Fold a recorder of the same layers over later images into this one (in place)."""
        if other.layer_names != self.layer_names or other.k != self.k:
            raise ValueError("can only merge recorders of the same layers and k")
        offset, n_self, n_other = len(self.image_ids), len(self.image_ids), len(other.image_ids)
        for name in self.layer_names:
            self.states[name].merge(other.states[name], offset, n_self, n_other, self.rng)
        self.image_ids += other.image_ids
        self.rejects += other.rejects
        return self

    def result(self) -> RecordResult:
        n = len(self.image_ids)
        layers = {}
        for name, st in self.states.items():
            gh, gw = st.grid
            loc = st.top_loc.cpu().numpy()
            mean = st.sum / max(n, 1)
            var = np.maximum(st.sumsq / max(n, 1) - mean * mean, 0.0)
            sample = st.res[: min(n, self.reservoir)]
            if len(sample):
                q50, q90, q99 = np.quantile(sample, [0.5, 0.9, 0.99], axis=0)
            else:
                q50 = q90 = q99 = np.full(st.n_units, np.nan)
            edges = np.zeros((st.n_units, N_HIST_BINS + 1), np.float64)
            counts = np.zeros((st.n_units, N_HIST_BINS), np.int64)
            for u in range(st.n_units if len(sample) else 0):
                lo, hi = st.vmin[u], st.vmax[u]
                if hi <= lo:
                    hi = lo + 1e-6
                counts[u], edges[u] = np.histogram(sample[:, u], N_HIST_BINS, (lo, hi))
            stats = {"act_mean": mean, "act_std": np.sqrt(var),
                     "act_max": np.where(np.isfinite(st.vmax), st.vmax, np.nan),
                     "frac_active": st.n_active / max(n, 1), "q50": q50, "q90": q90, "q99": q99,
                     "hist_edges": edges, "hist_counts": counts}
            pm = np.concatenate(st.mean_chunks) if st.pooled and st.mean_chunks else (
                np.zeros((0, st.n_units), np.float16) if st.pooled else None)
            px = np.concatenate(st.max_chunks) if st.pooled and st.max_chunks else (
                np.zeros((0, st.n_units), np.float16) if st.pooled else None)
            layers[name] = LayerResult(
                name, st.n_units, gh, gw, st.top_idx.cpu().numpy(), st.top_val.cpu().numpy(),
                st.top_mean.cpu().numpy(), (loc // gw).astype(np.int32), (loc % gw).astype(np.int32),
                pm, px, stats, st.top_maps.cpu().numpy() if st.top_maps is not None else None)
        return RecordResult(self.target.id, self.dataset, list(self.image_ids), layers, list(self.rejects))


def record(target: Target, layers: Sequence[str], source, k: int = 10, batch_size: int = 64,
           pooled: bool = True, num_workers: int = 0, progress: bool = True,
           reservoir: int = 4096) -> RecordResult:
    """Record `layers` of `target` over an ImageSource (folder, probe world table, ...).
    Rejected files are skipped and returned in `result.rejects`."""
    rec = Recorder(target, layers, k=k, dataset=source.dataset, pooled=pooled, reservoir=reservoir)
    with rec:
        for batch in source.batches(target.preprocess, batch_size, num_workers=num_workers,
                                    progress=progress):
            rec.update(batch.image_ids, batch.pixels)
    rec.rejects = list(source.rejects)
    return rec.result()


def record_batches(target: Target, layers: Sequence[str], batches: Iterable[tuple[Sequence[str], torch.Tensor]],
                   dataset: str, k: int = 10, pooled: bool = True, reservoir: int = 4096) -> RecordResult:
    """Record from any iterable of (image_ids, pixels [b, 3, S, S]) — e.g. generated images."""
    with Recorder(target, layers, k=k, dataset=dataset, pooled=pooled, reservoir=reservoir) as rec:
        for ids, pixels in batches:
            rec.update(ids, pixels)
    return rec.result()
