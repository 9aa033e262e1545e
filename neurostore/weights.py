"""Loading weights: one random initialisation per spec, and one line when a download fails.
Shared by the target models (neurostore.models) and the OpenCLIP encoders (neurostore.openclip).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import urllib.parse
import urllib.request

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


REACH_S = 3.0  # seconds a weights host gets to accept a connection before it counts as unreachable


@contextlib.contextmanager
def downloading(what: str, offline_hint: str, url: str | None = None):
    """Turn a failed weights download (no network, hub unreachable) into one line: which
    weights, that they could not be downloaded, and what to use offline.

    `url`: where the weights would come from. When its host does not answer within REACH_S, no
    download is tried: the Hugging Face hub is asked for its local cache only and other sockets
    time out after REACH_S, so an offline machine gets the line at once (the hub's own retries
    took ~50 s) and weights already in a local cache still load."""
    down = unreachable(url) if url else None
    try:
        with _offline(down is not None):
            yield
    except Exception as e:
        root = _network_error(e)
        if root is None:
            raise
        reason = f"{down}, and they are not in the local cache" if down else \
            (str(getattr(root, "reason", "") or root).strip().splitlines() or [type(root).__name__])[0][:160]
        raise BadInput(f"Could not download the weights of {what} ({reason}). On a machine "
                       f"without network use {offline_hint}.") from None


def unreachable(url: str, timeout: float = REACH_S) -> str | None:
    """Why `url`'s host does not accept a connection within `timeout` seconds; None when it
    does, or when a proxy is configured for it (then only the proxy can tell)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname or urllib.request.getproxies().get(parts.scheme) \
            and not urllib.request.proxy_bypass(parts.hostname):
        return None
    port = parts.port or (80 if parts.scheme == "http" else 443)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{parts.hostname} cannot be reached: {e.strerror or e}"
    return None


def hub_url() -> str:
    """The Hugging Face hub the weights of hub-hosted models come from (huggingface_hub's own
    reading of $HF_ENDPOINT)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


@contextlib.contextmanager
def _offline(on: bool):
    """While `on`: the Hugging Face hub in offline mode (its local cache only), new sockets with a
    REACH_S timeout (urllib, as torch.hub uses it, has none), and the libraries' own log lines
    about the failed download silenced (downloading() says it in one line)."""
    if not on:
        yield
        return
    from huggingface_hub import constants

    offline, timeout = constants.HF_HUB_OFFLINE, socket.getdefaulttimeout()
    constants.HF_HUB_OFFLINE = True
    socket.setdefaulttimeout(REACH_S)
    try:
        with logging_quiet(logging.ERROR):
            yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        socket.setdefaulttimeout(timeout)


@contextlib.contextmanager
def logging_quiet(level: int = logging.WARNING):
    """No log records at `level` or below while inside (libraries' lines that would mislead);
    the level disabled before is restored after, so these nest."""
    before = logging.root.manager.disable
    logging.disable(max(level, before))
    try:
        yield
    finally:
        logging.disable(before)


def _network_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e` (urllib's URLError, requests' and huggingface_hub's errors are
    OSErrors), also where a library re-raised it as another error, as open_clip does with a
    RuntimeError; None when there is none."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None
