"""The probe world's vision-language encoder: a small image tower trained so that images and
crops land next to the frozen MiniLM embeddings of their captions (locked-text contrastive
training, as in LiT). Text goes through the real MiniLM, so any word or phrase can be scored
against probe images — the offline stand-in for OpenCLIP behind the same Encoder interface.

Training crops are what the pipeline will later show it: single objects in tight boxes and in
loose ones (shifted and rescaled, like receptive-field patches), background regions, the cue, and
whole images. Each crop's positives are a few short captions from a small fixed set (shape word,
colour word, "colour shape", texture words, the cue word), so MiniLM encodes only that set once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from ..encoding import Encoder
from ..textembed import get_text_embedder
from . import generate as gen
from .train import fit

INPUT_SIZE = 32
MEAN, STD = 0.5, 0.25


class ProbeTower(nn.Module):
    """Four convolutions (with batch norm), mean and max pooling, a linear map into the text space.
    Spelled out like the probe CNN (world/targets.py), not built by a helper they share, on purpose:
    their strides, pooling and norm differ and were tuned apart, and each reads at a glance."""

    def __init__(self, dim: int = 384, widths: tuple[int, ...] = (32, 64, 96, 128), norm: bool = True):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.conv1 = nn.Conv2d(3, c1, 3, stride=1, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, stride=2, padding=1)
        # Batch norm: loose-box shape accuracy 0.897 -> 0.913 at the same training length.
        bn = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.bn1, self.bn2, self.bn3, self.bn4 = bn(c1), bn(c2), bn(c3), bn(c4)
        self.proj = nn.Linear(c4 * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 3, 32, 32]
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)  # [n, c1, 16, 16]
        x = F.relu(self.bn2(self.conv2(x)))  # [n, c2, 8, 8]
        x = F.relu(self.bn3(self.conv3(x)))  # [n, c3, 4, 4]
        x = F.relu(self.bn4(self.conv4(x)))  # [n, c4, 2, 2]
        # mean and max pooling: "is there a dot anywhere" and "what is this region mostly"
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)  # [n, 2*c4]
        return F.normalize(self.proj(pooled), dim=-1)  # [n, dim]


def _to_input(x_uint8: torch.Tensor) -> torch.Tensor:
    return (x_uint8.permute(0, 3, 1, 2).float() / 255.0 - MEAN) / STD


def _resize(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    if image.size != (INPUT_SIZE, INPUT_SIZE):
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return image


class ProbeEncoder(Encoder):
    """Encoder interface over a trained ProbeTower and the frozen MiniLM text model."""

    dim = 384
    image_size = INPUT_SIZE

    def __init__(self, tower: ProbeTower, id: str):
        self.tower = self.module = tower.eval()
        self.id = id

    @classmethod
    def load(cls, path: str | Path, id: str) -> "ProbeEncoder":
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        tower = ProbeTower(state["dim"], tuple(state["widths"]), norm=state.get("norm", False))
        tower.load_state_dict(state["weights"])
        return cls(tower, id)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(_resize(image), dtype=np.uint8).copy())
        return _to_input(arr[None])[0]

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        # the tower ends in F.normalize: its fp32 rows are kept bit for bit (the demo's figures)
        out = [self._run(self.tower, batch[i : i + 512], normalize=False) for i in range(0, len(batch), 512)]
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        # MiniLM runs on the encoder's device too (it is frozen: any device gives the same space).
        return torch.from_numpy(get_text_embedder(device=str(self.device)).encode(list(texts)))


# ---- captions and crops -----------------------------------------------------------------------


def caption_set(cue_kind: str) -> list[str]:
    """The fixed captions every crop's positives are drawn from (small: MiniLM encodes it once)."""
    caps = list(gen.SHAPES) + list(gen.COLOUR_NAMES)
    caps += [f"{c} {s}" for c in gen.COLOUR_NAMES for s in gen.SHAPES]
    caps += list(gen.TEXTURES) + [f"{t} background" for t in gen.TEXTURES]
    caps += [cue_kind]
    return caps


def _object_boxes(objmap: np.ndarray, k: int):
    """Tight boxes (x0, y0, x1, y1), exclusive ends, of object slot k; valid = object exists."""
    m = objmap == k  # [n, S, S]
    rows, cols = m.any(2), m.any(1)  # [n, S]
    valid = rows.any(1)
    S = objmap.shape[1]
    y0, y1 = rows.argmax(1), S - rows[:, ::-1].argmax(1)
    x0, x1 = cols.argmax(1), S - cols[:, ::-1].argmax(1)
    return np.stack([x0, y0, x1, y1], 1).astype(np.float64), valid


def loosen(boxes: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Shift and rescale boxes the way receptive-field patches differ from tight boxes: side
    ×0.8–2.0, centre moved by up to a quarter of the side; clipped to the image."""
    n = len(boxes)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    sc = rng.uniform(0.8, 2.0, (n, 2))
    cx = cx + rng.uniform(-0.25, 0.25, n) * w
    cy = cy + rng.uniform(-0.25, 0.25, n) * h
    w, h = np.maximum(w * sc[:, 0], 4), np.maximum(h * sc[:, 1], 4)
    out = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return np.clip(out, 0, size)


def _background_boxes(occupied: np.ndarray, rng: np.random.Generator, loose: bool):
    """One box per image over background (tight: < 3% object pixels; loose: bigger boxes with up
    to 25%); valid=False where no candidate qualified."""
    n, S, _ = occupied.shape
    integral = np.zeros((n, S + 1, S + 1), np.int32)
    integral[:, 1:, 1:] = occupied.cumsum(1).cumsum(2)
    cand = 12
    lo, hi = (0.18, 0.45) if not loose else (0.3, 0.8)
    side = (rng.uniform(lo, hi, (n, cand, 2)) * S).astype(np.int64)
    x0 = (rng.uniform(0, 1, (n, cand)) * (S - side[..., 0] + 1)).astype(np.int64)
    y0 = (rng.uniform(0, 1, (n, cand)) * (S - side[..., 1] + 1)).astype(np.int64)
    x1, y1 = x0 + side[..., 0], y0 + side[..., 1]
    ii = np.arange(n)[:, None]
    area = integral[ii, y1, x1] - integral[ii, y0, x1] - integral[ii, y1, x0] + integral[ii, y0, x0]
    frac = area / (side[..., 0] * side[..., 1])
    ok = frac < (0.25 if loose else 0.03)
    pick = ok.argmax(1)
    valid = ok.any(1)
    r = np.arange(n)
    boxes = np.stack([x0[r, pick], y0[r, pick], x1[r, pick], y1[r, pick]], 1).astype(np.float64)
    return boxes, valid


def _cue_boxes(template: np.ndarray, kind: str, n: int, rng: np.random.Generator, loose: bool):
    S = template.shape[0]
    if kind == "frame":  # a stretch of border: the frame is only visible near an edge
        side = rng.uniform(0.15, 0.35 if not loose else 0.5, (n, 2)) * S
        along = rng.uniform(0, 1, n) * (S - side[:, 0])
        edge = rng.integers(0, 4, n)
        x0 = np.where(edge == 0, 0, np.where(edge == 1, S - side[:, 0], along))
        y0 = np.where(edge == 2, 0, np.where(edge == 3, S - side[:, 1], along))
        x0 = np.where(edge >= 2, along, x0)
        y0 = np.where(edge < 2, rng.uniform(0, 1, n) * (S - side[:, 1]), y0)
        return np.stack([x0, y0, x0 + side[:, 0], y0 + side[:, 1]], 1)
    ys, xs = np.nonzero(template)
    box = np.array([xs.min() - 1, ys.min() - 1, xs.max() + 2, ys.max() + 2], np.float64)
    boxes = np.repeat(box[None], n, 0).clip(0, S)
    return loosen(boxes, rng, S) if loose else boxes


def crop_batch(images: np.ndarray, rows: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """uint8 [m, 32, 32, 3] crops of images[rows] in boxes, resized exactly as preprocess()
    resizes a PIL crop (PIL bilinear), so training and use see the same pixels."""
    out = np.empty((len(rows), INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    for j, (r, b) in enumerate(zip(rows, boxes)):
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        crop = Image.fromarray(images[r]).crop((x0, y0, x1, y1))
        out[j] = np.asarray(_resize(crop))
    return out


def make_crops(images, objmap, sc, cue_mask, cue_kind, rng, captions, whole: bool = True):
    """Training crops and their positives -> (uint8 [m,32,32,3], multi-hot float [m, C])."""
    index = {c: i for i, c in enumerate(captions)}
    n, S = images.shape[0], images.shape[1]
    all_rows, all_boxes, all_pos = [], [], []

    def add(rows, boxes, pos_lists):
        all_rows.append(rows)
        all_boxes.append(boxes)
        all_pos.extend(pos_lists)

    for k in range(gen.MAX_OBJECTS):
        boxes, valid = _object_boxes(objmap, k)
        rows = np.flatnonzero(valid)
        pos = []
        for r in rows:
            s, c = gen.SHAPES[sc["obj_shape"][r, k]], gen.COLOUR_NAMES[sc["obj_colour"][r, k]]
            pos.append([index[s], index[c], index[f"{c} {s}"]])
        add(rows, boxes[rows], pos)
        add(rows, loosen(boxes[rows], rng, S), pos)
    occupied = (objmap >= 0) | cue_mask
    for loose in (False, True):
        boxes, valid = _background_boxes(occupied, rng, loose)
        rows = np.flatnonzero(valid)
        pos = []
        for r in rows:
            t = gen.TEXTURES[sc["bg_texture"][r]]
            pos.append([index[t], index[f"{t} background"]])
        add(rows, boxes[rows], pos)
    cue_rows = np.flatnonzero(cue_mask.any((1, 2)))
    if len(cue_rows):
        template = cue_mask[cue_rows[0]]
        for loose in (False, True):
            add(cue_rows, _cue_boxes(template, cue_kind, len(cue_rows), rng, loose),
                [[index[cue_kind]]] * len(cue_rows))
    if whole:
        rows = np.arange(n)
        pos = []
        for r in rows:
            p = [index[gen.TEXTURES[sc["bg_texture"][r]]]]
            for k in range(int(sc["n_obj"][r])):
                s, c = gen.SHAPES[sc["obj_shape"][r, k]], gen.COLOUR_NAMES[sc["obj_colour"][r, k]]
                p += [index[s], index[c], index[f"{c} {s}"]]
            if cue_mask[r].any():
                p.append(index[cue_kind])
            pos.append(sorted(set(p)))
        add(rows, np.repeat(np.array([[0, 0, S, S]], np.float64), n, 0), pos)
    rows = np.concatenate(all_rows)
    boxes = np.concatenate(all_boxes)
    crops = crop_batch(images, rows, boxes)
    target = np.zeros((len(rows), len(captions)), np.float32)
    for j, p in enumerate(all_pos):
        target[j, p] = 1.0
    return crops, target


def train_tower(crops: np.ndarray, target: np.ndarray, text: torch.Tensor, *, epochs: float,
                seed: int, lr: float = 3e-3, batch_size: int = 128,
                on_step: Callable[[int], None] | None = None) -> ProbeTower:
    """Multi-positive contrastive loss of each crop against the fixed caption set (text frozen);
    the target spreads evenly over a crop's positives. Temperature is learned."""
    torch.manual_seed(seed)
    tower = ProbeTower()
    log_scale = nn.Parameter(torch.tensor(np.log(20.0), dtype=torch.float32))
    params = list(tower.parameters()) + [log_scale]
    x, t = torch.from_numpy(crops), torch.from_numpy(target)
    t = t / t.sum(1, keepdim=True)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        emb = tower(_to_input(x[idx]))  # [b, 384]
        logits = log_scale.clamp(max=np.log(100.0)).exp() * emb @ text.T  # [b, C]
        return -(t[idx] * F.log_softmax(logits, 1)).sum(1).mean()

    tower.train()
    fit(params, len(x), batch_loss, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size,
        weight_decay=1e-4, on_step=on_step)
    return tower.eval()


def save_tower(tower: ProbeTower, path: Path) -> None:
    widths = (tower.conv1.out_channels, tower.conv2.out_channels, tower.conv3.out_channels,
              tower.conv4.out_channels)
    torch.save({"weights": tower.state_dict(), "dim": tower.proj.out_features,
                "widths": list(widths), "norm": isinstance(tower.bn1, nn.BatchNorm2d)}, path)


@torch.no_grad()
def zero_shot(encoder: Encoder, images, objmap, sc, cue_mask, rng, max_items: int = 600):
    """Zero-shot accuracy on held-out crops, through the public path (PIL crop -> preprocess ->
    encode_images vs encode_texts of the candidate words). Objects are asked their shape among
    the shape words and their colour among the colour words; background regions their texture
    among the texture words; each for tight and loose boxes."""
    S = images.shape[1]
    cands = {"shape": gen.SHAPES, "colour": gen.COLOUR_NAMES, "texture": gen.TEXTURES}
    text = {k: encoder.encode_texts(v) for k, v in cands.items()}
    result: dict[str, dict[str, float]] = {"shape": {}, "colour": {}, "texture": {}}
    obj = [(r, k) for k in range(gen.MAX_OBJECTS) for r in np.flatnonzero(sc["n_obj"] > k)]
    obj = [obj[i] for i in rng.permutation(len(obj))[:max_items]]
    for loose in (False, True):
        name = "loose" if loose else "tight"
        boxes = np.zeros((len(obj), 4))
        for j, (r, k) in enumerate(obj):
            b, _ = _object_boxes(objmap[r : r + 1], k)
            boxes[j] = b[0]
        if loose:
            boxes = loosen(boxes, rng, S)
        rows = np.array([r for r, _ in obj])
        emb = _embed_boxes(encoder, images, rows, boxes)
        for cat, key in (("shape", "obj_shape"), ("colour", "obj_colour")):
            truth = np.array([sc[key][r, k] for r, k in obj])
            pred = (emb @ text[cat].T).argmax(1).numpy()
            result[cat][name] = round(float((pred == truth).mean()), 4)
        bboxes, valid = _background_boxes((objmap >= 0) | cue_mask, rng, loose)
        rows = np.flatnonzero(valid)[:max_items]
        emb = _embed_boxes(encoder, images, rows, bboxes[rows])
        pred = (emb @ text["texture"].T).argmax(1).numpy()
        result["texture"][name] = round(float((pred == sc["bg_texture"][rows]).mean()), 4)
    return result


def _embed_boxes(encoder: Encoder, images, rows, boxes) -> torch.Tensor:
    crops = []
    for r, b in zip(rows, boxes):
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        crops.append(Image.fromarray(images[r]).crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))))
    return encoder.embed_pil(crops, batch_size=256)
