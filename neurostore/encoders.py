"""Vision-language encoders behind one interface, chosen by a spec string.

    open_clip:ViT-B-32/laion2b_s34b_b79k   OpenCLIP by model name and pretrained tag (online)
    open_clip:/path/to/checkpoint.pt       a local OpenCLIP checkpoint (model name from the file)
    probe[:WORLD_DIR]                      the probe world's encoder, aligned to MiniLM (offline)

Every encoder embeds images and texts into one space, rows of unit length, so a dot product is
a cosine similarity; `id` names the exact weights and goes into provenance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from PIL import Image

from .errors import UnknownEncoder


class Encoder(ABC):
    id: str          # provenance id, e.g. "open_clip:ViT-B-32/laion2b_s34b_b79k"
    dim: int         # embedding width
    image_size: int  # side of the square input preprocess() produces

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


def load_encoder(spec: str, worlds: Sequence[str] = ()) -> Encoder:
    """Resolve an encoder spec (see module doc) to a loaded Encoder. `worlds`: folders to look
    in for a 'probe:<world id>' spec besides the cache (the worlds a store was built from)."""
    kind, _, rest = spec.partition(":")
    if kind == "open_clip":
        from .openclip import OpenClipEncoder

        return OpenClipEncoder.from_spec(rest)
    if kind == "probe":
        from .world import load_probe_encoder

        return load_probe_encoder(rest or None, search=worlds)
    raise UnknownEncoder(
        f"Unknown encoder '{spec}'. Use 'open_clip:MODEL/PRETRAINED' (e.g. "
        "open_clip:ViT-B-32/laion2b_s34b_b79k), 'open_clip:/path/to/checkpoint.pt', or 'probe' "
        "for the offline probe-world encoder."
    )
