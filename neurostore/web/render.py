"""HTML rendering shared by the static report and the web app: Jinja templates (autoescaped),
link building for both (absolute routes for the app, relative file paths for the report), and
the plot helpers the templates call."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import functools
import hashlib
import json
import math
import re
import uuid
from pathlib import Path
from urllib.parse import quote, urlencode

from markupsafe import Markup

from .. import __version__
from .. import plots

TEMPLATES = Path(__file__).resolve().parent / "templates"
PATCH_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")


class Links:
    """URLs of every page. `static=True` gives paths relative to a page `depth` folders below the
    report root (the report works opened from disk); otherwise the web app's routes."""

    def __init__(self, static: bool = False, depth: int = 0):
        self.static = static
        self.prefix = "../" * depth if static else "/"

    def _q(self, s) -> str:
        return quote(str(s), safe="")

    def css(self) -> str:
        return self.prefix + "style.css"

    def index(self) -> str:
        return self.prefix + ("index.html" if self.static else "")

    def model(self, m) -> str:
        return f"{self.prefix}model/{self._q(m)}" + (".html" if self.static else "")

    def layer(self, m, l) -> str:
        return f"{self.prefix}layer/{self._q(m)}/{self._q(l)}" + (".html" if self.static else "")

    def neuron(self, m, l, u) -> str:
        return f"{self.prefix}neuron/{self._q(m)}/{self._q(l)}/{int(u)}" + (".html" if self.static else "")

    def patch(self, pid) -> str:
        return f"{self.prefix}patch{'es' if self.static else ''}/{self._q(pid)}.png"

    def image(self, key) -> str:
        """A whole probe image (key: see data.image_png)."""
        return f"{self.prefix}image{'s' if self.static else ''}/{self._q(key)}.png"

    def heatmap(self, m, l, u, rank) -> str:
        """A unit's map over its top image `rank` (data.heatmap_jpeg); the report names the file by
        heatmap_key, as model and layer names need not be file names."""
        if self.static:
            return f"{self.prefix}heatmaps/{heatmap_key(m, l, u, rank)}.jpg"
        return f"{self.prefix}heatmap/{self._q(m)}/{self._q(l)}/{int(u)}/{int(rank)}.jpg"

    def findings(self, kind: str) -> str:
        return f"{self.prefix}{kind}" + (".html" if self.static else "")

    def search(self, q: str | None = None, mode: str | None = None) -> str:
        args = {k: v for k, v in (("q", q), ("mode", mode)) if v}
        return "/search" + ("?" + urlencode(args) if args else "")

    def sql(self, q: str | None = None, params: dict | None = None) -> str:
        return "/sql" + ("?" + urlencode({"q": q, **(params or {})}) if q else "")

    def sql_download(self, q: str, params: dict | None, fmt: str) -> str:
        return f"/sql.{fmt}?" + urlencode({"q": q, **(params or {})})

    def named(self, name: str) -> str:
        return f"/query/{self._q(name)}"

    def tables(self) -> str:
        return "/tables"


def heatmap_key(m, l, u, rank) -> str:
    return hashlib.md5(f"{m}/{l}/{int(u)}/{int(rank)}".encode()).hexdigest()[:16]


def fmt(v, digits: int = 3) -> str:
    """A number for people: 3 significant digits, thousands separators for big integers."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if math.isnan(f) or math.isinf(f):
        return str(f)
    if f == 0:
        return "0"
    if abs(f) >= 1e5 or abs(f) < 1e-3:
        return f"{f:.{digits}g}"
    return f"{f:.{digits}g}" if abs(f) >= 1 else f"{f:.{digits}f}".rstrip("0").rstrip(".")


# Column names as people say them (result tables of pages; the SQL console keeps SQL's names).
HEADERS = {"best_patch": "top patch", "top_patch": "top patch", "depth_frac": "depth", "rank_in_model": "rank",
           "found_by": "found by", "n_images": "images", "n_units": "units", "act_value": "activation",
           "grad_x_act": "grad × act", "auprc": "AUPRC", "pearson": "fidelity (Pearson r)",
           # unit_matches: whether the other matching method paired this unit with the same partner
           "agree": "other method same partner", "label_similarity": "label similarity (MiniLM)",
           "cue_flip_before": "cue flip before", "cue_flip_after": "cue flip after"}


def human(col: str) -> str:
    return HEADERS.get(col, str(col).replace("_", " "))


def people(v) -> str:
    """Any value as people read it: durations in h/min/s (DuckDB INTERVALs arrive as Arrow
    MonthDayNano), times to the second, the rest as str."""
    if type(v).__name__ == "MonthDayNano":  # pyarrow's (months, days, nanoseconds)
        months, days, ns = v
        parts = [f"{months} mo" if months else "", f"{days} d" if days else "", duration(ns / 1e9) if ns else ""]
        return " ".join(p for p in parts if p) or "0 s"
    if isinstance(v, dt.timedelta):
        return duration(v.total_seconds())
    if isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S") + (f" {v.tzname()}" if v.tzinfo else "")
    return str(v)


def duration(s: float) -> str:
    if s < 60:
        return f"{s:.3g} s"
    m, sec = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h else f"{m} min {sec} s"


def short(v, n: int = 80) -> str:
    s = json.dumps(jsonable(v))
    return s if len(s) <= n else s[: n - 1] + "…"


def jsonable(v):
    """Arrow/Python values -> JSON-safe values (bytes as {"$base64": ...}, as Datasette does)."""
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$base64": True, "encoded": base64.b64encode(bytes(v)).decode()}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, (decimal.Decimal,)):
        return float(v)
    if isinstance(v, (uuid.UUID, dt.timedelta)):
        return str(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def to_json(obj) -> str:
    return json.dumps(jsonable(obj), default=str)


def hist_svg(stats: dict) -> Markup:
    marks = {k: stats.get(k) for k in ("q50", "q99") if stats.get(k) is not None}
    return Markup(plots.histogram_svg(stats.get("hist_edges"), stats.get("hist_counts"), width=420, height=150,
                                      marks=marks))


def depth_svg(profile: dict, highlight: str | None = None) -> Markup:
    return Markup(plots.depth_profile_svg(profile["series"], profile["layers"], profile.get("depths"),
                                          highlight=highlight,
                                          title=f"Concepts by depth in {profile['model']}"))


def heat_legend() -> Markup:
    return Markup(plots.heat_legend_svg())


def bars(items: list[dict]) -> Markup:
    return Markup(plots.bar_list_svg([(i["concept"], i["n_units"]) for i in items], title="units per best concept"))


@functools.lru_cache(maxsize=1)
def environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html"], default=True),
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.globals.update(fmt=fmt, short=short, human=human, people=people, hist_svg=hist_svg, depth_svg=depth_svg, bars=bars,
                       heat_legend=heat_legend, version=__version__)
    env.tests["bytes_like"] = lambda v: isinstance(v, (bytes, bytearray, memoryview))
    env.tests["float"] = lambda v: isinstance(v, float)
    env.tests["temporal"] = lambda v: isinstance(v, (dt.date, dt.time, dt.timedelta)) or type(v).__name__ == "MonthDayNano"
    env.tests["png"] = lambda v: isinstance(v, (bytes, bytearray, memoryview)) and bytes(v[:4]) == b"\x89PNG"
    return env


def render(template: str, data: dict, links: Links, **extra) -> str:
    """One page: `template` with its `data` (the same dict the JSON view returns)."""
    env = environment()
    # Macros are imported into every page so templates stay short.
    tpl = env.get_template(template)
    macros = env.get_template("macros.html").make_module({"L": links, **env.globals})
    ctx = {"data": data, "L": links, **{k: getattr(macros, k) for k in
                                        ("num", "conf", "patch_img", "patch_grid", "top_images", "where", "cell",
                                         "rows_table", "untrained_note")}, **extra}
    return tpl.render(ctx)


def stylesheet() -> str:
    return (TEMPLATES / "style.css").read_text()
