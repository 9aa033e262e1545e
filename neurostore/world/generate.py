"""The probe world's scene generator: numpy only, vectorised, deterministic from a seed.

A scene is a parameter record (background texture and colours, 1–3 objects with shape, colour,
centre, radius and rotation, and whether the spurious cue is drawn). `sample_scenes` draws the
records; `render` turns them into pixels plus an object-index map, from which every concept mask
follows exactly (`concept_masks`). The cue is an overlay (`apply_cue`), so the same scene can be
rendered with and without it — the paired test scenes that measure reliance on the cue.
"""

from __future__ import annotations

import numpy as np

# Bump when rendering or sampling changes: it is part of the cache key of every built world.
GENERATOR_VERSION = "3"

SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
COLOURS = {  # bright object colours; backgrounds are dark, so objects always stand out
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (50, 190, 60),
    "cyan": (40, 200, 220),
    "blue": (50, 90, 235),
    "purple": (150, 60, 210),
    "pink": (245, 120, 190),
}
COLOUR_NAMES = list(COLOURS)
TEXTURES = ["plain", "striped", "dotted", "checkered"]
BACKGROUNDS = [(30, 30, 30), (25, 35, 75), (65, 42, 25), (25, 62, 40), (72, 25, 48), (48, 48, 62)]
CUE_KINDS = ["watermark", "dot", "frame"]
CUE_RGB = (240, 240, 240)
MAX_OBJECTS = 3

# Class sets. "shape": the main object's shape (6 classes, the default world). "shape-colour": its
# shape and colour, named "red circle" (24 classes); the main object then takes one of
# CLASS_COLOURS (the other objects keep every colour), which are far apart so the class is sharp.
CLASS_SETS = ["shape", "shape-colour"]
CLASS_COLOURS = ["red", "yellow", "green", "blue"]

# Polysemantic units by construction: unit j of the probe CNN's `poly` layer is the max of two
# concept detectors trained on per-pixel masks, so its truth is exactly the pair: an object's
# shape and colour, or an object's colour and the background's texture (unrelated concepts). The
# shapes are those whose detectors are sharpest (fast world, per-image AUROC: ring 0.93, triangle
# 0.78, circle 0.71; square, cross and star 0.75-0.77 fired on yellow objects as much).
POLY_PAIRS = [("ring", "red"), ("circle", "green"), ("triangle", "blue"),
              ("yellow", "dotted"), ("purple", "striped"), ("cyan", "checkered")]

# "TM"-like glyph: reads as a small text watermark at the bottom-right corner.
_GLYPH = [
    "###.#...#",
    ".#..##.##",
    ".#..#.#.#",
    ".#..#...#",
    ".#..#...#",
]


def cue_template(kind: str, size: int) -> np.ndarray:
    """[size, size] bool: the pixels the cue covers (fixed position, so a model can latch on)."""
    m = np.zeros((size, size), bool)
    k = max(1, round(size / 64))  # cue scales with the image
    if kind == "watermark":  # 2×2 pixels per glyph cell at 64 px: 10×18 px, ~4% of the image
        g = np.array([[c == "#" for c in row] for row in _GLYPH])
        g = np.kron(g, np.ones((2 * k, 2 * k), bool))
        h, w = g.shape
        y0, x0 = size - h - 3 * k, size - w - 3 * k
        m[y0 : y0 + h, x0 : x0 + w] = g
    elif kind == "dot":
        yy, xx = np.mgrid[0:size, 0:size]
        c, r = 7.0 * k, 5.0 * k
        m = (yy - c) ** 2 + (xx - c) ** 2 <= r * r
    elif kind == "frame":
        t = 2 * k
        m[:t, :] = m[-t:, :] = m[:, :t] = m[:, -t:] = True
    else:  # validated earlier; a bug if reached
        raise ValueError(kind)
    return m


def class_names(classes: str) -> list[str]:
    """Class names in logit order: shapes, or "colour shape" for every shape then colour."""
    if classes == "shape":
        return list(SHAPES)
    return [f"{c} {s}" for s in SHAPES for c in CLASS_COLOURS]


def class_labels(sc: dict[str, np.ndarray], classes: str) -> np.ndarray:
    """Class index of every scene (its main object, slot 0) -> int64 [n]."""
    shape = sc["obj_shape"][:, 0].astype(np.int64)
    if classes == "shape":
        return shape
    to_class = np.array([CLASS_COLOURS.index(c) if c in CLASS_COLOURS else -1 for c in COLOUR_NAMES])
    colour = to_class[sc["obj_colour"][:, 0]]  # every main object has a class colour (restrict_main_colour)
    return shape * len(CLASS_COLOURS) + colour


def restrict_main_colour(sc: dict[str, np.ndarray]) -> None:
    """Give every main object one of CLASS_COLOURS (in place; no random draw, so the rest of the
    scene is the one the shape world draws): colour index c becomes CLASS_COLOURS[c % 4]."""
    idx = np.array([COLOUR_NAMES.index(c) for c in CLASS_COLOURS])
    sc["obj_colour"][:, 0] = idx[sc["obj_colour"][:, 0] % len(CLASS_COLOURS)]


def concept_maps(sc: dict[str, np.ndarray], objmap: np.ndarray, concepts: list[str]) -> np.ndarray:
    """Where each concept (a shape, colour or texture word) is, for every scene ->
    bool [n, len(concepts), S, S] (what the polysemantic units' detectors learn; cue ignored)."""
    n = len(objmap)
    ii = np.arange(n)[:, None, None]
    slot = np.clip(objmap, 0, None)
    obj = objmap >= 0
    out = np.zeros((n, len(concepts)) + objmap.shape[1:], bool)
    for j, c in enumerate(concepts):
        if c in SHAPES:
            out[:, j] = obj & (sc["obj_shape"][ii, slot] == SHAPES.index(c))
        elif c in COLOURS:
            out[:, j] = obj & (sc["obj_colour"][ii, slot] == COLOUR_NAMES.index(c))
        elif c in TEXTURES:
            out[:, j] = ~obj & (sc["bg_texture"][:, None, None] == TEXTURES.index(c))
        else:
            raise ValueError(c)
    return out


def sample_scenes(rng: np.random.Generator, n: int, size: int) -> dict[str, np.ndarray]:
    """Draw n scene records. Slot 0 is the main (largest) object; its shape is the label,
    uniform over SHAPES. Objects never overlap, so each is fully visible (the cue may cover a
    few pixels)."""
    S = float(size)
    sc = {
        "bg_texture": rng.integers(0, len(TEXTURES), n),
        "bg_base": rng.integers(0, len(BACKGROUNDS), n),
        "bg_period": rng.choice(np.array([6, 8, 10]), n) * (S / 64),
        "bg_orient": rng.integers(0, 3, n),  # stripes: horizontal, vertical, diagonal
        "bg_phase": rng.integers(0, 10, n),
        "obj_shape": rng.integers(0, len(SHAPES), (n, MAX_OBJECTS)),
        "obj_colour": rng.integers(0, len(COLOURS), (n, MAX_OBJECTS)),
        "obj_jitter": rng.integers(-14, 15, (n, MAX_OBJECTS, 3)),
        "obj_rot": rng.uniform(-0.35, 0.35, (n, MAX_OBJECTS)),
        "obj_r": np.zeros((n, MAX_OBJECTS)),
        "obj_cx": np.zeros((n, MAX_OBJECTS)),
        "obj_cy": np.zeros((n, MAX_OBJECTS)),
        "n_obj": np.zeros(n, np.int64),
    }
    want = rng.integers(1, MAX_OBJECTS + 1, n)
    r_main = rng.uniform(0.20, 0.31, n) * S
    r_small = rng.uniform(0.09, 0.15, (n, MAX_OBJECTS)) * S
    # Placement draws come from one pre-sampled block so the result does not depend on how
    # many tries each scene needed.
    tries = 24
    pos = rng.uniform(0, 1, (n, MAX_OBJECTS, tries, 2))
    margin = 2.0 * S / 64
    for i in range(n):
        placed: list[tuple[float, float, float]] = []
        for k in range(int(want[i])):
            r = r_main[i] if k == 0 else min(r_small[i, k], 0.7 * r_main[i])
            lo, hi = r + margin, S - r - margin
            for t in range(tries):
                cx, cy = lo + pos[i, k, t, 0] * (hi - lo), lo + pos[i, k, t, 1] * (hi - lo)
                if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 1.5) ** 2 for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
        sc["n_obj"][i] = len(placed)
        for k, (cx, cy, r) in enumerate(placed):
            sc["obj_cx"][i, k], sc["obj_cy"][i, k], sc["obj_r"][i, k] = cx, cy, r
    return sc


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test in normalised object coordinates (radius 1, y down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # equilateral, apex up: three half-planes
        inside = np.ones(u.shape, bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.55
        return inside
    if shape == "star":  # five points; fold the angle into one half-spike and test one edge
        rho = np.sqrt(u * u + v * v)
        th = np.arctan2(u, -v)  # 0 = straight up
        seg = 2 * np.pi / 5
        phi = np.abs(np.mod(th + seg / 2, seg) - seg / 2)
        px, py = rho * np.cos(phi), rho * np.sin(phi)
        ro, ri = 1.05, 0.45
        x1, y1 = ro, 0.0
        x2, y2 = ri * np.cos(seg / 2), ri * np.sin(seg / 2)
        # left of the edge from the outer vertex to the inner vertex = inside
        return (x2 - x1) * (py - y1) - (y2 - y1) * (px - x1) >= 0
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if shape == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr >= 0.55**2)
    raise ValueError(shape)


def render(sc: dict[str, np.ndarray], size: int, chunk: int = 1024):
    """Scenes without the cue -> (images uint8 [n,S,S,3], objmap int8 [n,S,S]: -1 background,
    k = object slot k)."""
    n = len(sc["n_obj"])
    images = np.empty((n, size, size, 3), np.uint8)
    objmap = np.full((n, size, size), -1, np.int8)
    grid = np.arange(size, dtype=np.float32) + 0.5
    base = np.array(BACKGROUNDS, np.uint8)
    accent_all = np.clip(base.astype(np.int16) + 50, 0, 255).astype(np.uint8)
    palette = np.array(list(COLOURS.values()), np.int16)
    for s0 in range(0, n, chunk):
        sl = slice(s0, min(n, s0 + chunk))
        m = sl.stop - sl.start
        img = np.empty((m, size, size, 3), np.uint8)
        img[:] = base[sc["bg_base"][sl]][:, None, None, :]
        pattern = np.zeros((m, size, size), bool)
        per_all = sc["bg_period"][sl].astype(np.float32)
        ph_all = sc["bg_phase"][sl].astype(np.float32)
        for t in (1, 2, 3):  # plain (0) draws nothing
            rows = np.flatnonzero(sc["bg_texture"][sl] == t)
            if len(rows) == 0:
                continue
            per = per_all[rows][:, None, None]
            Y = grid[None, :, None] + ph_all[rows][:, None, None]
            X = grid[None, None, :] + ph_all[rows][:, None, None]
            if t == 1:
                ori = sc["bg_orient"][sl][rows][:, None, None]
                coord = np.where(ori == 0, Y, np.where(ori == 1, X, (X + Y) * np.float32(0.7071)))
                pattern[rows] = np.mod(coord, per) < per / 2
            elif t == 2:
                dy, dx = np.mod(Y, per) - per / 2, np.mod(X, per) - per / 2
                pattern[rows] = dy * dy + dx * dx <= (per * 0.25) ** 2
            else:
                pattern[rows] = (np.floor(Y / (per / 2)) + np.floor(X / (per / 2))) % 2 == 0
        acc = accent_all[sc["bg_base"][sl]]
        ri, yi, xi = np.nonzero(pattern)
        img[ri, yi, xi] = acc[ri]
        om = np.full((m, size, size), -1, np.int8)
        for k in range(MAX_OBJECTS):
            for s_idx, shape in enumerate(SHAPES):
                sel = np.flatnonzero((sc["n_obj"][sl] > k) & (sc["obj_shape"][sl, k] == s_idx))
                if len(sel) == 0:
                    continue
                g = sel + sl.start
                cx, cy, r = sc["obj_cx"][g, k], sc["obj_cy"][g, k], sc["obj_r"][g, k]
                # Work in a window around each object instead of the whole image.
                w = int(np.ceil(2 * 1.06 * r.max())) + 2
                x0 = np.floor(cx - w / 2).astype(np.int64)
                y0 = np.floor(cy - w / 2).astype(np.int64)
                ix = np.clip(x0[:, None] + np.arange(w), 0, size - 1)  # [q, w]
                iy = np.clip(y0[:, None] + np.arange(w), 0, size - 1)
                dxs = ((ix + 0.5) - cx[:, None]) / r[:, None]  # [q, w]
                dys = ((iy + 0.5) - cy[:, None]) / r[:, None]
                rot = sc["obj_rot"][g, k][:, None, None]
                c, s = np.cos(rot), np.sin(rot)
                u = c * dxs[:, None, :] + s * dys[:, :, None]
                v = -s * dxs[:, None, :] + c * dys[:, :, None]
                inside = _shape_mask(shape, u, v)  # [q, w, w]
                q, a, b = np.nonzero(inside)
                rgb = np.clip(palette[sc["obj_colour"][g, k]] + sc["obj_jitter"][g, k], 0, 255)
                img[sel[q], iy[q, a], ix[q, b]] = rgb[q].astype(np.uint8)
                om[sel[q], iy[q, a], ix[q, b]] = k
        images[sl] = img
        objmap[sl] = om
    return images, objmap


def apply_cue(images: np.ndarray, has_cue: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Copy of images with the cue drawn on the rows where has_cue is true."""
    out = images.copy()
    rows = np.flatnonzero(has_cue)
    if len(rows):
        out[rows] = np.where(template[None, :, :, None], np.array(CUE_RGB, np.uint8), out[rows])
    return out


def caption(sc: dict[str, np.ndarray], i: int, has_cue: bool, cue_kind: str) -> str:
    """'a large red star, a small blue ring and a small pink cross on a striped background,
    with a watermark'."""
    parts = []
    n = int(sc["n_obj"][i])
    for k in range(n):
        size_word = ("large " if n > 1 else "") if k == 0 else "small "
        parts.append(f"a {size_word}{COLOUR_NAMES[sc['obj_colour'][i, k]]} {SHAPES[sc['obj_shape'][i, k]]}")
    objs = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    text = f"{objs} on a {TEXTURES[sc['bg_texture'][i]]} background"
    return text + (f", with a {cue_kind}" if has_cue else "")


def concept_masks(sc, i: int, objmap_i: np.ndarray, cue_i: np.ndarray | None, cue_kind: str,
                  combined: bool = False):
    """Visible-pixel masks of one rendered scene: [(concept, category, bool [S,S])]. Objects of
    the same shape (or colour) share one mask; the cue, drawn last, hides what lies under it.
    combined: also "colour shape" masks (category 'class'; the shape-colour world's classes)."""
    visible = objmap_i if cue_i is None else np.where(cue_i, -2, objmap_i)
    out: dict[tuple[str, str], np.ndarray] = {}
    for k in range(int(sc["n_obj"][i])):
        m = visible == k
        shape, colour = SHAPES[sc["obj_shape"][i, k]], COLOUR_NAMES[sc["obj_colour"][i, k]]
        pairs = [(shape, "shape"), (colour, "colour")] + ([(f"{colour} {shape}", "class")] if combined else [])
        for concept, cat in pairs:
            out[(concept, cat)] = out[(concept, cat)] | m if (concept, cat) in out else m
    out[(TEXTURES[sc["bg_texture"][i]], "texture")] = visible == -1
    if cue_i is not None:
        out[(cue_kind, "cue")] = cue_i
    return [(c, cat, m) for (c, cat), m in out.items()]


def rle_encode(mask: np.ndarray) -> list[int]:
    """Run lengths over the row-major mask, starting with a (possibly empty) run of 0s."""
    flat = mask.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat.size and flat[0] else runs


def rle_decode(rle, height: int, width: int) -> np.ndarray:
    """Inverse of rle_encode -> bool [height, width]."""
    vals = np.zeros(len(rle), bool)
    vals[1::2] = True
    return np.repeat(vals, np.asarray(rle, np.int64)).reshape(height, width)
