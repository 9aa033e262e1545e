"""What `dissect`, `demo` and `evaluate` return: dataclasses with `.to_dict()` (what `--json`
prints, the same keys these functions' dicts always had), attributes for the main fields, and
`result["key"]` for code written against those dicts. `DissectResult` draws itself as a small
table in a notebook."""

from __future__ import annotations

import html
from dataclasses import dataclass, field, fields
from typing import Any, Optional


class _Result:
    def __getitem__(self, key: str) -> Any:
        """`result["run_id"]`, as when these functions returned dicts."""
        return self.to_dict()[key]


@dataclass
class EvaluationResult(_Result):
    """Figures of stored explanations against the probe world's truth (evaluation.py's metrics).

    figures: {model: {layer: {scorer: {metric: value}}}}; rows: the `evaluations` rows (metric,
    value, n per model, layer and scorer); run_id: the run that wrote them (None: not written)."""

    figures: dict[str, dict[str, dict[str, dict[str, float]]]]
    rows: list[dict] = field(default_factory=list, repr=False)
    run_id: Optional[str] = None

    def to_dict(self) -> dict:
        return self.figures


@dataclass
class DissectResult(_Result):
    """One dissect: what was dissected, what it wrote (in one run, `run_id`), where time went."""

    run_id: str
    model: str
    spec: str
    dataset: str
    images: int
    rejects: int
    layers: list[str]
    units: int
    patches: int
    patch_boxes: int
    vocabulary: str
    concepts: int
    scorers: list[str]
    encoder: str
    random_weights: dict[str, bool]
    device: str
    precision: str
    rows: dict[str, int]                  # rows written per table
    seconds: float
    timings: dict[str, float]             # seconds per stage
    # how often images were decoded and run through each model, and what the encoder encoded
    # (embeddings already in the store are reused, not counted)
    passes: dict[str, int]
    resumed_from: int
    checkpoints: int
    evaluation: Optional[EvaluationResult] = None   # probe-world dissects only

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "evaluation"}
        if self.evaluation is not None:
            d["evaluation"] = self.evaluation.to_dict()
        return d

    def _repr_html_(self) -> str:
        cells = [("model", self.model), ("run", self.run_id), ("images", self.images),
                 ("layers", ", ".join(self.layers)), ("units", self.units), ("scorers", ", ".join(self.scorers)),
                 ("vocabulary", f"{self.vocabulary} ({self.concepts} concepts)"), ("encoder", self.encoder),
                 ("timings", ", ".join(f"{k} {v:.2f} s" for k, v in self.timings.items())),
                 ("seconds", self.seconds)]
        body = "".join(f"<tr><th style='text-align:left'>{k}</th><td style='text-align:left'>"
                       f"{html.escape(str(v))}</td></tr>" for k, v in cells)
        return f"<table><caption>dissect</caption>{body}</table>"


@dataclass
class DemoResult(_Result):
    """The demo: the probe world used, a dissect of each of its models, three questions answered."""

    store: str
    world: dict
    dissections: dict[str, DissectResult]
    answers: list[dict]                   # question, query, params, rows (first 10), n_rows
    seconds: float

    def to_dict(self) -> dict:
        return {"store": self.store, "world": self.world,
                "dissections": {k: v.to_dict() for k, v in self.dissections.items()},
                "answers": self.answers, "seconds": self.seconds}

    def _repr_html_(self) -> str:
        return "".join(d._repr_html_() for d in self.dissections.values())
