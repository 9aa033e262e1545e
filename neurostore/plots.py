"""Small SVG plots for the report and the web UI, generated in Python (no JavaScript, nothing
fetched from the network), so a page opened from disk shows them as they are.

    histogram_svg(edges, counts)                         -> "<svg ...>"  activation histogram
    depth_profile_svg(series, layers, highlight=None)    -> "<svg ...>"  concept share by layer depth
    heatmap_jpeg(image, cells)                           -> JPEG bytes   a unit's map over an image
    heat_legend_svg()                                    -> "<svg ...>"  the heatmap's colour scale

The heatmap is a PNG made here, not drawn in the page: the web app's CSP forbids inline styles and
scripts, and the static report must show the same picture opened from disk.
"""

from __future__ import annotations

import io
from html import escape
from typing import Sequence

import numpy as np

# Colour-blind-safe categorical palette (Okabe-Ito), in a fixed order so a category keeps its colour.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")


def _fmt(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000 or a < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def histogram_svg(edges: Sequence[float] | None, counts: Sequence[int] | None, width: int = 320,
                  height: int = 140, marks: dict[str, float] | None = None, title: str = "Activation histogram") -> str:
    """Bars of `counts` over bins `edges` (len(counts) + 1). `marks` draws labelled vertical lines
    (e.g. {"q99": 3.2}). Empty input gives a small 'no histogram' note."""
    edges = [float(e) for e in (edges or []) if e is not None]
    counts = [int(c or 0) for c in (counts or [])]
    if len(counts) == 0 or len(edges) != len(counts) + 1 or edges[-1] <= edges[0]:
        return (f'<svg class="plot" role="img" width="{width}" height="40" viewBox="0 0 {width} 40">'
                f'<title>{escape(title)}</title><text x="4" y="24" class="muted">no histogram recorded</text></svg>')
    ml, mr, mt, mb = 34, 8, 8, 22
    pw, ph = width - ml - mr, height - mt - mb
    lo, hi = edges[0], edges[-1]
    top = max(counts) or 1

    def x(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
             f'<line x1="{ml}" y1="{mt + ph}" x2="{ml + pw}" y2="{mt + ph}" class="axis"/>']
    for i, c in enumerate(counts):
        if c <= 0:
            continue
        x0, x1 = x(edges[i]), x(edges[i + 1])
        h = c / top * ph
        parts.append(f'<rect class="bar" x="{x0:.1f}" y="{mt + ph - h:.1f}" width="{max(x1 - x0 - 0.5, 0.5):.1f}" '
                     f'height="{h:.1f}"><title>{_fmt(edges[i])} – {_fmt(edges[i + 1])}: {c} images</title></rect>')
    for name, v in (marks or {}).items():
        if v is None or not lo <= v <= hi:
            continue
        xv = x(float(v))
        right = xv > ml + pw * 0.8  # label on the inner side so it is never clipped
        parts.append(f'<line class="mark" x1="{xv:.1f}" y1="{mt}" x2="{xv:.1f}" y2="{mt + ph}"/>'
                     f'<text class="tick" x="{xv - 2 if right else xv + 2:.1f}" y="{mt + 9}" '
                     f'text-anchor="{"end" if right else "start"}">{escape(name)}</text>')
    parts.append(f'<text class="tick" x="{ml}" y="{height - 6}" text-anchor="start">{_fmt(lo)}</text>')
    parts.append(f'<text class="tick" x="{ml + pw}" y="{height - 6}" text-anchor="end">{_fmt(hi)}</text>')
    parts.append(f'<text class="tick" x="{ml - 4}" y="{mt + 8}" text-anchor="end">{top}</text>')
    parts.append(f'<text class="tick" x="{ml - 4}" y="{mt + ph}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def depth_profile_svg(series: dict[str, Sequence[float | None]], layers: Sequence[str],
                      depths: Sequence[float] | None = None, highlight: str | None = None, width: int = 560,
                      height: int = 220, ylabel: str = "share of units",
                      title: str = "Concepts by depth") -> str:
    """One line per series over the model's layers (x = depth, 0 = input end). `series[name][i]` is
    the value at `layers[i]` in [0, 1] (None = no data). `highlight` marks one layer."""
    n = len(layers)
    if n == 0 or not series:
        return (f'<svg class="plot" role="img" width="{width}" height="40" viewBox="0 0 {width} 40">'
                f'<title>{escape(title)}</title><text x="4" y="24" class="muted">no layers with concepts yet</text></svg>')
    legend_w = 150
    ml, mr, mt, mb = 40, legend_w + 10, 10, 46
    pw, ph = width - ml - mr, height - mt - mb
    if depths is None or len(depths) != n or any(d is None for d in depths):
        depths = [i / (n - 1) if n > 1 else 0.5 for i in range(n)]
    lo, hi = min(depths), max(depths)
    span = (hi - lo) or 1.0
    top = max([v for vals in series.values() for v in vals if v is not None] + [0.0])
    top = 1.0 if top > 0.5 else max(top * 1.15, 0.05)

    def x(d: float) -> float:
        return ml + ((d - lo) / span * pw if n > 1 else pw / 2)

    def y(v: float) -> float:
        return mt + ph - v / top * ph

    parts = [f'<svg class="plot" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for frac in (0.0, 0.5, 1.0):
        yy = y(top * frac)
        parts.append(f'<line class="grid" x1="{ml}" y1="{yy:.1f}" x2="{ml + pw}" y2="{yy:.1f}"/>'
                     f'<text class="tick" x="{ml - 4}" y="{yy + 3:.1f}" text-anchor="end">{top * frac:.0%}</text>')
    for i, name in enumerate(layers):
        xx = x(depths[i])
        cls = "tick hl" if name == highlight else "tick"
        if name == highlight:
            parts.append(f'<rect class="hlband" x="{xx - 6:.1f}" y="{mt}" width="12" height="{ph}"/>')
        label = name if len(name) <= 14 else "…" + name[-13:]
        parts.append(f'<text class="{cls}" transform="translate({xx:.1f},{mt + ph + 10}) rotate(30)">'
                     f'<title>{escape(name)}</title>{escape(label)}</text>')
    for k, (name, vals) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = [(x(depths[i]), y(v), v, layers[i]) for i, v in enumerate(vals) if v is not None]
        if len(pts) > 1:
            d = " ".join(f"{'M' if j == 0 else 'L'}{px:.1f},{py:.1f}" for j, (px, py, _, _) in enumerate(pts))
            parts.append(f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for px, py, v, lname in pts:
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}">'
                         f'<title>{escape(name)} at {escape(lname)}: {v:.0%}</title></circle>')
        ly = mt + 6 + k * 16
        parts.append(f'<rect x="{ml + pw + 14}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
                     f'<text class="legend" x="{ml + pw + 28}" y="{ly + 1}">{escape(name[:20])}</text>')
    parts.append(f'<text class="tick" x="{ml}" y="{height - 2}">input</text>'
                 f'<text class="tick" x="{ml + pw}" y="{height - 2}" text-anchor="end">output</text>')
    parts.append(f'<text class="tick" transform="translate(10,{mt + ph / 2:.0f}) rotate(-90)" '
                 f'text-anchor="middle">{escape(ylabel)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_list_svg(items: Sequence[tuple[str, float]], width: int = 320, row: int = 16,
                 title: str = "Counts") -> str:
    """Horizontal bars for (label, value) pairs, largest first as given."""
    if not items:
        return ""
    top = max(v for _, v in items) or 1
    lw = 110
    h = row * len(items) + 4
    parts = [f'<svg class="plot" role="img" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for i, (label, v) in enumerate(items):
        yy = 2 + i * row
        w = (width - lw - 40) * v / top
        parts.append(f'<text class="tick" x="{lw - 4}" y="{yy + 11}" text-anchor="end">{escape(str(label)[:18])}</text>'
                     f'<rect class="bar" x="{lw}" y="{yy + 2}" width="{w:.1f}" height="{row - 4}"/>'
                     f'<text class="tick" x="{lw + w + 4:.1f}" y="{yy + 11}">{_fmt(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# The heatmap's colour scale (inferno, sampled): dark purple at the map's minimum to pale yellow at
# its maximum, perceptually ordered and far from the cut box's blue.
HEAT_STOPS = ((0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)),
              (1.0, (252, 255, 164)))
HEAT_ALPHA = (0.0, 0.75)  # opacity at the map's min and max: where the unit is silent the image shows
HEAT_SIDE = 192           # the composite's longer side in pixels (probe images are 64 px)


def _heat_lut() -> np.ndarray:
    """[256, 4] uint8 RGBA for map values 0..1 in 256 steps."""
    t = np.linspace(0, 1, 256)
    xs = [s for s, _ in HEAT_STOPS]
    rgb = np.stack([np.interp(t, xs, [c[i] for _, c in HEAT_STOPS]) for i in range(3)], 1)  # [256, 3]
    a = 255 * (HEAT_ALPHA[0] + (HEAT_ALPHA[1] - HEAT_ALPHA[0]) * t)                         # [256]
    return np.concatenate([rgb, a[:, None]], 1).round().astype(np.uint8)


# zlib level of the PNGs a report writes by the thousand (heatmaps, whole images): lossless at any
# level; 1 encodes several times faster than the default 6 for somewhat larger files.
PNG_LEVEL = 1
HEAT_QUALITY = 85         # JPEG quality of the heatmaps


def heatmap_jpeg(image, cells: Sequence[Sequence[int]], side: int = HEAT_SIDE) -> bytes:
    """`image` (PIL, the region the unit saw) scaled so its longer side is `side` px, with the
    unit's map `cells` (rows of 0..100, see schema/activations.sql act_map) bilinear-upsampled
    over it as a translucent heatmap (HEAT_STOPS, HEAT_ALPHA). Returns JPEG bytes: a photo under a
    blurred map, where a PNG was ten times the size (a report holds one per unit and top image)."""
    from PIL import Image

    W, H = image.size
    f = side / max(W, H)
    size = (max(1, round(W * f)), max(1, round(H * f)))
    base = image.convert("RGBA").resize(size, Image.Resampling.BILINEAR)
    m = np.clip(np.asarray(cells, dtype=np.float32), 0, 100) * (255 / 100)        # [h, w] 0..255
    up = Image.fromarray(m.round().astype(np.uint8), "L").resize(size, Image.Resampling.BILINEAR)
    heat = Image.fromarray(_heat_lut()[np.asarray(up)], "RGBA")                   # [H', W', 4]
    buf = io.BytesIO()
    Image.alpha_composite(base, heat).convert("RGB").save(buf, format="JPEG", quality=HEAT_QUALITY)
    return buf.getvalue()


def heat_legend_svg(width: int = 180, height: int = 14) -> str:
    """The heatmap's colour scale as a bar from 'min' to 'max' of the unit's map on the image."""
    a0, a1 = HEAT_ALPHA
    stops = "".join(f'<stop offset="{s:.2f}" stop-color="rgb{c}" stop-opacity="{a0 + (a1 - a0) * s:.2f}"/>'
                    for s, c in HEAT_STOPS)
    bar = width - 60
    return (f'<svg class="legend" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'xmlns="http://www.w3.org/2000/svg"><title>heatmap colours: the unit&#39;s activation on the image, '
            f'from its minimum to its maximum there</title><defs><linearGradient id="heat">{stops}</linearGradient></defs>'
            f'<text class="tick" x="0" y="{height - 3}">min</text>'
            f'<rect x="26" y="1" width="{bar}" height="{height - 2}" fill="#d8dbe0"/>'
            f'<rect x="26" y="1" width="{bar}" height="{height - 2}" fill="url(#heat)"/>'
            f'<text class="tick" x="{30 + bar}" y="{height - 3}">max</text></svg>')
