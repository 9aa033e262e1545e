"""neurostore: explain what the neurons of vision networks detect, in words, and keep every piece
of evidence in an open Parquet store queried with DuckDB SQL.

    import neurostore as ns
    store = ns.open("neurostore-store")                     # a Store (created when missing)
    ns.dissect(store, "torchvision:resnet50@IMAGENET1K_V2", images="photos/", layers=["layer4"])
    ns.find(store, "striped").to_dict()
    store.sql("SELECT * FROM explanations LIMIT 5")          # pyarrow.Table

Every function takes the store first (a Store or a path). Attributes load on first use, so
`import neurostore` stays light (torch is imported only by what runs a model)."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .errors import NeurostoreError  # noqa: E402  (no heavy imports: safe to load eagerly)

# name -> (module, attribute): the whole public API.
_API = {
    "Store": ("store", "Store"),
    "open": ("store", "open"),
    "dissect": ("pipeline", "dissect"),
    "demo": ("pipeline", "demo"),
    "evaluate": ("evaluation", "evaluate"),
    "DissectResult": ("results", "DissectResult"),
    "DemoResult": ("results", "DemoResult"),
    "EvaluationResult": ("results", "EvaluationResult"),
    "find": ("analysis", "find"),
    "compare": ("analysis", "compare"),
    "audit": ("analysis", "audit"),
    "ablate": ("analysis", "ablate"),
    "import_results": ("fieldresults", "import_results"),
    "evaluate_classes": ("classeval", "evaluate_classes"),
    "assess": ("trust", "assess"),
    "fit_features": ("features", "fit"),
    "groups": ("grouping", "groups"),
    "build_report": ("report", "build_report"),
    "build_world": ("world", "build_world"),
    "load_world": ("world", "load_world"),
    "WorldConfig": ("world", "WorldConfig"),
    "load_target": ("models", "load_target"),
    "load_encoder": ("encoders", "load_encoder"),
    "load_vocabulary": ("vocab", "load_vocabulary"),
    "resolve_device": ("devices", "resolve_device"),
    "errors": ("errors", None),
}

__all__ = ["NeurostoreError", "__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'neurostore' has no attribute {name!r}")
    module, attr = _API[name]
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
