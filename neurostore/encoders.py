"""Vision-language encoders chosen by a spec string: the registry over their implementations.

    open_clip:ViT-B-32/laion2b_s34b_b79k   OpenCLIP by model name and pretrained tag (online)
    open_clip:/path/to/checkpoint.pt       a local OpenCLIP checkpoint (model name from the file)
    probe[:WORLD_DIR]                      the probe world's encoder, aligned to MiniLM (offline)

The interface they share is `Encoder` (neurostore.encoding, re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import devices
from .encoding import Encoder
from .errors import UnknownEncoder
from .openclip import OpenClipEncoder
from .world import load_probe_encoder

__all__ = ["Encoder", "load_encoder"]


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
        return OpenClipEncoder.from_spec(rest).to(dev, precision)
    if kind == "probe":
        return load_probe_encoder(rest or None, search=worlds).to(dev, precision)
    raise UnknownEncoder(
        f"Unknown encoder '{spec}'. Use 'open_clip:MODEL/PRETRAINED' (e.g. "
        "open_clip:ViT-B-32/laion2b_s34b_b79k), 'open_clip:/path/to/checkpoint.pt', or 'probe' "
        "for the offline probe-world encoder."
    )
