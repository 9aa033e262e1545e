"""Loading weights: one random initialisation per spec, and one line when a download fails.
Shared by the target models (neurostore.models) and the OpenCLIP encoders (neurostore.openclip).
"""

from __future__ import annotations

import contextlib

import torch

from .errors import BadInput


@contextlib.contextmanager
def seeded(seed: int = 0):
    """Random initialisation that is the same in every process: `@random` targets and `/random`
    encoders get one set of weights per spec, so their cached embeddings and checkpoints stay
    valid across runs. The caller's RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def reinitialise(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every layer's parameters and running statistics drawn afresh, in place, from
    torch's current RNG (seed it first): the untrained twin of a trained network, same architecture,
    the control a random baseline needs."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return module


@contextlib.contextmanager
def downloading(what: str, offline_hint: str):
    """Turn a failed weights download (no network, hub unreachable) into one line: which
    weights, that they could not be downloaded, and what to use offline."""
    try:
        yield
    except Exception as e:
        root = _network_error(e)
        if root is None:
            raise
        reason = (str(getattr(root, "reason", "") or root).strip().splitlines() or [type(root).__name__])[0]
        raise BadInput(f"Could not download the weights of {what} ({reason[:160]}). On a machine "
                       f"without network use {offline_hint}.") from None


def _network_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (urllib's URLError, requests' and huggingface_hub's errors are
    OSErrors), also where a library re-raised it as another error, as open_clip does with a
    RuntimeError; None when there is none."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None
