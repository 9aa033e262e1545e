"""The Encoder interface every vision-language encoder implements (OpenCLIP, the probe world's).

Every encoder embeds images and texts into one space, rows of unit length, so a dot product is
a cosine similarity; `id` names the exact weights and goes into provenance. It runs on its
`device` under autocast to `dtype` (None: fp32), takes CPU tensors and strings, and returns float32
CPU tensors: callers never move data. `random_weights` marks an untrained encoder.

The interface sits below its implementations (neurostore.openclip, neurostore.world.encoder) and
the registry that picks one by spec (neurostore.encoders.load_encoder), so the imports stay one-way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import devices
from .store import Store


@dataclass(frozen=True)
class SplitPreprocess:
    """A torchvision-style preprocessing [PIL steps..., (Maybe)ToTensor, Normalize] in two halves:
    `pixels(im)`, the PIL steps and a uint8 [3, S, S] tensor (cheap, per image, in worker
    threads), and `finish(batch)`, the float conversion and normalisation of a whole uint8 batch at
    once, on the batch's device. The same numbers as the whole: x / 255, then (x - mean) / std.
    Converting and normalising crop by crop was 3/4 of cutting patches on a CPU."""

    pil: Callable
    mean: tuple
    std: tuple

    @classmethod
    def of(cls, preprocess) -> "SplitPreprocess | None":
        """The split of a `preprocess` of that form (open_clip's and torchvision's), else None;
        an object that knows its own split says it (`as_split`: images.CellWindows)."""
        if hasattr(preprocess, "as_split"):
            return preprocess.as_split()
        steps = list(getattr(preprocess, "transforms", None) or [])
        names = [type(t).__name__ for t in steps]
        if len(steps) < 2 or names[-1] != "Normalize" or names[-2] not in ("ToTensor", "MaybeToTensor"):
            return None
        norm = steps[-1]
        if getattr(norm, "inplace", False) or len(norm.mean) != 3:
            return None
        from torchvision.transforms import Compose

        return cls(Compose(steps[:-2]), tuple(float(m) for m in norm.mean), tuple(float(v) for v in norm.std))

    def uint8(self, image: Image.Image) -> torch.Tensor:
        """`pixels` as a tensor (a DataLoader worker's half; `finish` makes the rest)."""
        return torch.from_numpy(self.pixels(image))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[3, S, S] uint8, in numpy: called from many threads at once, where torch's own thread
        pool on each small copy stalls (seen: 6 ms a crop on a busy 2-core machine)."""
        a = np.asarray(self.pil(image).convert("RGB"), dtype=np.uint8)           # [S, S, 3]
        return np.ascontiguousarray(a.transpose(2, 0, 1))

    def batch(self, pixels: Sequence[np.ndarray], device="cpu") -> torch.Tensor:
        """`pixels` of many images -> [b, 3, S, S] float32 on `device`, normalised."""
        return self.finish(torch.from_numpy(np.stack(pixels)).to(device))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        """[b, 3, S, S] uint8 -> float32, normalised (on batch's device)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1)
        return batch.float().div_(255).sub_(mean).div_(std)


class Encoder(ABC):
    id: str          # provenance id, e.g. "open_clip:ViT-B-32/laion2b_s34b_b79k"
    dim: int         # embedding width
    image_size: int  # side of the square input preprocess() produces
    module: torch.nn.Module             # the image tower (and text tower, where it has one)
    device: torch.device = torch.device("cpu")
    dtype: "torch.dtype | None" = None  # autocast dtype; None = fp32
    random_weights: bool = False

    def to(self, device: "str | torch.device | None" = "cpu", precision: str | None = None) -> "Encoder":
        """Run on `device` (a --device spec) at `precision` (auto, fp32, fp16, bf16); returns self."""
        self.device = devices.resolve_device(device)
        self.dtype = devices.resolve_precision(precision, self.device)
        self.module.to(self.device)
        return self

    @torch.no_grad()
    def _run(self, forward, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """forward(x on the device) under autocast -> [n, dim] float32 unit rows on the CPU
        (normalize=False: forward already returns unit rows in fp32 and exactly those are kept)."""
        with devices.autocast(self.device, self.dtype):
            out = forward(x.to(self.device, non_blocking=True))
        if normalize or out.dtype != torch.float32:
            out = torch.nn.functional.normalize(out.float(), dim=-1)
        return out.cpu()

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image (any size) -> [3, image_size, image_size] float tensor."""

    def split_preprocess(self) -> "SplitPreprocess | None":
        """`preprocess` in a per-image uint8 half and a batched normalising half, where it has
        that form (SplitPreprocess); None where it does not."""
        return SplitPreprocess.of(self.preprocess)

    @abstractmethod
    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] preprocessed -> [n, dim] float32, unit rows."""

    @abstractmethod
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """n strings -> [n, dim] float32, unit rows."""

    @torch.no_grad()
    def embed_pil(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Convenience: preprocess and encode PIL images in batches -> [n, dim]."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[i : i + batch_size]])
            out.append(self.encode_images(batch))
        return torch.cat(out) if out else torch.zeros(0, self.dim)


# ---- embeddings kept in the store: computed once per (encoder, kind, item) ----------------------

def cached_vectors(store: Store, encoder_id: str, kind: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Stored vectors of `ids` (those there are) for this encoder and kind."""
    if not ids or "embeddings" not in store.tables():
        return {}
    # an IN filter, duplicates (two runs that encoded the same item) dropped here: a GROUP BY
    # with any_value(vector) cost 4x the time on 262,144 rows
    t = store.sql("SELECT item_id, vector FROM embeddings WHERE encoder = $e AND kind = $k "
                  "AND item_id IN (SELECT unnest($ids))",
                  {"ids": list(dict.fromkeys(ids)), "e": encoder_id, "k": kind})
    if not t.num_rows:
        return {}
    vec = t.column("vector").combine_chunks()
    m = np.asarray(vec.flatten(), np.float32).reshape(t.num_rows, -1)  # [n, dim]
    return dict(zip(t.column("item_id").to_pylist(), m))


def cached_ids(store: Store, encoder_id: str, kind: str) -> frozenset:
    if "embeddings" not in store.tables():
        return frozenset()
    t = store.sql("SELECT DISTINCT item_id FROM embeddings WHERE encoder = $e AND kind = $k",
                  {"e": encoder_id, "k": kind})
    return frozenset(t.column("item_id").to_pylist())
