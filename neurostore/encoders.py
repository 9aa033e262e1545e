"""Vision-language encoders behind one interface, chosen by a spec string.

    open_clip:ViT-B-32/laion2b_s34b_b79k   OpenCLIP by model name and pretrained tag (online)
    open_clip:/path/to/checkpoint.pt       a local OpenCLIP checkpoint (model name from the file)
    probe[:WORLD_DIR]                      the probe world's encoder, aligned to MiniLM (offline)

Every encoder embeds images and texts into one space, rows of unit length, so a dot product is
a cosine similarity; `id` names the exact weights and goes into provenance. It runs on its
`device` under autocast to `dtype` (None: fp32), takes CPU tensors and strings, and returns float32
CPU tensors: callers never move data. `random_weights` marks an untrained encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from PIL import Image

from . import devices
from .errors import UnknownEncoder


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


def load_encoder(spec: str, worlds: Sequence[str] = (), device: "str | torch.device | None" = None,
                 precision: str | None = None) -> Encoder:
    """Resolve an encoder spec (see module doc) to a loaded Encoder on `device` (default auto:
    CUDA when present) at `precision` (default auto: fp32 on the CPU). `worlds`: folders to look
    in for a 'probe:<world id>' spec besides the cache (the worlds a store was built from)."""
    kind, _, rest = spec.partition(":")
    # Check the device first: a typo there should not cost a model load.
    dev = devices.resolve_device(device)
    devices.resolve_precision(precision, dev)
    if kind == "open_clip":
        from .openclip import OpenClipEncoder

        return OpenClipEncoder.from_spec(rest).to(dev, precision)
    if kind == "probe":
        from .world import load_probe_encoder

        return load_probe_encoder(rest or None, search=worlds).to(dev, precision)
    raise UnknownEncoder(
        f"Unknown encoder '{spec}'. Use 'open_clip:MODEL/PRETRAINED' (e.g. "
        "open_clip:ViT-B-32/laion2b_s34b_b79k), 'open_clip:/path/to/checkpoint.pt', or 'probe' "
        "for the offline probe-world encoder."
    )
