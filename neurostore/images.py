"""Probe images: stream a folder (or a list of files) in batches, converting odd images to RGB and
skipping the ones that cannot be used, with the reason recorded.

    source = ImageFolder("photos/")                 # recursive, sorted, image_id = relative path
    for batch in source.batches(target.preprocess, batch_size=64):
        batch.image_ids, batch.pixels               # list[str], [b, 3, S, S]
    source.rejects_table()                          # schema/rejects.sql minus run_id
    source.images_table()                           # schema/images.sql minus run_id, content_hash

Conversions (the run goes on): CMYK, palette, grayscale, YCbCr, LAB and HSV become RGB; RGBA,
LA and palette-with-transparency are composited over white (transparent pixels hold arbitrary
colours that would otherwise leak in); 16-bit and 32-bit grayscale are scaled to 8 bits; EXIF
orientation is applied; animated images use their first frame.

Rejects (skipped, recorded with the reason): zero bytes, not an image, truncated or corrupt,
too small (shorter side < `min_side`, default 16 px), too large (more than `max_pixels`, default
50 MP — a decompression bomb is refused from its header, before any pixel is decoded).

Memory is bounded by the batch size: files are decoded one at a time as the batches are drawn.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .encoding import SplitPreprocess
from .errors import BadInput, BadParameter
from .progress import bar as progress_bar
from .scorers import border_cells
from .world.generate import rle_decode

MIN_SIDE = 16
MAX_PIXELS = 50_000_000


class RejectedImage(Exception):
    """Raised by `load_image` with the reason a file cannot be used (not a user error: the run
    records it and goes on)."""


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        # Palette images may carry a transparent index; go through RGBA so it is composited.
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if mode == "F":
            top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        elif mode.startswith("I;16") or (a.size and a.max() > 255):
            top = 65535.0
        else:
            top = 255.0
        a = np.clip(np.nan_to_num(a) / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def load_image(path: str | os.PathLike, min_side: int = MIN_SIDE,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode one file to an RGB PIL image, or raise RejectedImage(reason)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RejectedImage(f"unreadable: {e.strerror or e}") from e
    if size == 0:
        raise RejectedImage("zero bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit decides; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise RejectedImage("not an image") from None
    except Image.DecompressionBombError as e:
        raise RejectedImage(f"too large: {e}") from None
    except OSError as e:
        raise RejectedImage(f"corrupt: {e}") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise RejectedImage(f"too large: {w}x{h} px is more than {max_pixels / 1e6:g} MP")
        if min(w, h) < min_side:
            raise RejectedImage(f"too small: {w}x{h} px, the shorter side must be >= {min_side}")
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Another library may have flipped this global; we want truncation to be reported.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            msg = str(e)
            kind = "truncated" if "truncated" in msg.lower() else "corrupt"
            raise RejectedImage(f"{kind} {im.format or 'image'}: {msg}") from None
        try:
            im = ImageOps.exif_transpose(im)
        except Exception:  # a broken EXIF block should not cost the image
            pass
        return _to_rgb(im).copy()


@dataclass
class Batch:
    indices: list[int]                # positions of the images in the source (0..n-1)
    image_ids: list[str]
    pixels: torch.Tensor              # [b, 3, S, S] preprocessed
    sizes: list[tuple[int, int]]      # original (width, height)
    rejects: list[dict] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # content hash of each file (see file_hash)
    # `also` preprocessing of the same decoded images: [m, 3, S', S'] of the images whose hash
    # is not in `skip_also` (their rows in the batch: `also_rows`)
    also: list[torch.Tensor] = field(default_factory=list)
    also_rows: list[int] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """DataLoader(pin_memory=True) calls this: page-locked tensors copy to CUDA asynchronously."""
        self.pixels = self.pixels.pin_memory()
        self.also = [a.pin_memory() for a in self.also]
        return self


def file_hash(path: str | os.PathLike) -> str:
    """An image's content id: 16 hex of the SHA-1 of its bytes (never its name)."""
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


class _Files(torch.utils.data.Dataset):
    """Map-style dataset over (image_id, path); an item is ("ok", ...) or ("reject", ...), so
    rejects travel back through the DataLoader even when decoding runs in worker processes.
    Each file is decoded once; every preprocessing (`preprocess`, then `also`) takes that image."""

    def __init__(self, items, preprocess, min_side, max_pixels, also=(), skip_also=frozenset()):
        self.items, self.preprocess = items, preprocess
        self.min_side, self.max_pixels = min_side, max_pixels
        self.also, self.skip_also = tuple(also), skip_also

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        image_id, path = self.items[i]
        try:
            im = load_image(path, self.min_side, self.max_pixels)
            h = file_hash(path)
        except RejectedImage as e:
            return ("reject", i, image_id, str(path), str(e))
        also = None if h in self.skip_also else tuple(p(im) for p in self.also)
        return ("ok", i, image_id, self.preprocess(im), im.size, h, also)


def _collate(items):
    ok = [it for it in items if it[0] == "ok"]
    rejects = [{"path": p, "reason": r, "image_id": iid} for _, _, iid, p, r in
               (it for it in items if it[0] == "reject")]
    pixels = torch.stack([it[3] for it in ok]) if ok else torch.zeros(0)
    rows = [j for j, it in enumerate(ok) if it[6]]
    also = [torch.stack([ok[j][6][a] for j in rows]) for a in range(len(ok[rows[0]][6]))] if rows else []
    return Batch([it[1] for it in ok], [it[2] for it in ok], pixels, [it[4] for it in ok], rejects,
                 [it[5] for it in ok], also, rows)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.") or "images"


class ImageSource:
    """An ordered list of (image_id, path) pairs under one dataset id, streamed in batches."""

    def __init__(self, dataset: str, items: list[tuple[str, str]], *, min_side: int = MIN_SIDE,
                 max_pixels: int = MAX_PIXELS, labels: dict | None = None):
        self.dataset = dataset
        self.items = items
        self.min_side, self.max_pixels = min_side, max_pixels
        self.labels = labels or {}
        self.rejects: list[dict] = []          # filled while streaming
        self.sizes: dict[str, tuple[int, int]] = {}
        self.position = 0
        self._paths = dict(items)

    def __len__(self) -> int:
        return len(self.items)

    def take(self, n: int) -> None:
        """Keep at most `n` items: the first `n` (a probe world's order is already a random draw)."""
        self.items = self.items[:n]

    @classmethod
    def from_table(cls, dataset: str, table: pa.Table, **kw) -> "ImageSource":
        """From an images table (schema/images.sql): the probe world's `world.images()`."""
        ids = table.column("image_id").to_pylist()
        paths = table.column("path").to_pylist()
        labels = dict(zip(ids, table.column("label").to_pylist())) if "label" in table.column_names else None
        return cls(dataset, list(zip(ids, paths)), labels=labels, **kw)

    def load(self, image_id: str) -> Image.Image:
        """The RGB image with this id (for the patch pass)."""
        return load_image(self._paths[image_id], self.min_side, self.max_pixels)

    def batches(self, preprocess: Callable[[Image.Image], torch.Tensor], batch_size: int = 64,
                num_workers: int = 0, progress: bool = False, *, start: int = 0,
                also: tuple[Callable, ...] = (), skip_also: frozenset = frozenset(),
                device=None) -> Iterator[Batch]:
        """Decoded, preprocessed batches in source order, from item `start` on (a resumed run).
        Rejected files are appended to `self.rejects` and left out of the batches; a batch can
        hence be smaller than asked. `also`: more preprocessings of the same decoded image (an
        encoder's), skipped for files whose content hash is in `skip_also`. `num_workers`
        processes decode in parallel (DataLoader). The pixels come on `device` (default the CPU;
        CUDA: through pinned memory): a preprocessing of the usual form (SplitPreprocess: PIL
        steps, ToTensor, Normalize) travels as uint8 and is normalised there, a batch at once;
        the same numbers, a quarter of the bytes between processes, no per-image float work."""
        if start == 0:
            self.rejects = []
        self.position = start  # items (images and rejects) consumed so far: where a resume starts
        device = torch.device(device or "cpu")
        split = lambda p: p if isinstance(p, SplitPreprocess) else SplitPreprocess.of(p)   # noqa: E731
        pre, more = split(preprocess) or preprocess, tuple(split(p) or p for p in also)
        # a SplitPreprocess's uint8 half runs in the workers; `finish` below makes the rest
        half = lambda p: p.uint8 if isinstance(p, SplitPreprocess) else p   # noqa: E731
        ds = _Files(self.items, half(pre), self.min_side, self.max_pixels, tuple(map(half, more)), skip_also)
        if start:
            ds = torch.utils.data.Subset(ds, range(start, len(self.items)))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=_collate, persistent_workers=False, pin_memory=device.type == "cuda",
        )

        def finish(p, x: torch.Tensor) -> torch.Tensor:
            x = x.to(device, non_blocking=True)
            return p.finish(x) if isinstance(p, SplitPreprocess) else x

        bar = progress_bar(len(self.items), f"images {self.dataset}", "img", progress, initial=start)
        try:
            for batch in loader:
                for r in batch.rejects:
                    self.rejects.append({"dataset": self.dataset, "path": r["path"],
                                         "reason": r["reason"]})
                for iid, size in zip(batch.image_ids, batch.sizes):
                    self.sizes[iid] = size
                self.position += len(batch.image_ids) + len(batch.rejects)
                bar.update(len(batch.image_ids) + len(batch.rejects))
                if batch.image_ids:
                    batch.pixels = finish(pre, batch.pixels)
                    batch.also = [finish(p, x) for p, x in zip(more, batch.also)]
                    yield batch
        finally:
            bar.close()

    def rejects_table(self) -> pa.Table:
        """schema/rejects.sql minus run_id."""
        return pa.table({
            "dataset": pa.array([r["dataset"] for r in self.rejects], pa.string()),
            "path": pa.array([r["path"] for r in self.rejects], pa.string()),
            "reason": pa.array([r["reason"] for r in self.rejects], pa.string()),
        })

    def images_table(self) -> pa.Table:
        """schema/images.sql minus run_id and content_hash (the dissect's pass adds it), for the
        images decoded so far (after `batches`)."""
        ids = [iid for iid, _ in self.items if iid in self.sizes]
        return pa.table({
            "dataset": pa.array([self.dataset] * len(ids), pa.string()),
            "image_id": pa.array(ids, pa.string()),
            "path": pa.array([str(Path(self._paths[i]).resolve()) for i in ids], pa.string()),
            "width": pa.array([self.sizes[i][0] for i in ids], pa.int32()),
            "height": pa.array([self.sizes[i][1] for i in ids], pa.int32()),
            "label": pa.array([self.labels.get(i) for i in ids], pa.string()),
            "caption": pa.array([None] * len(ids), pa.string()),
            "split": pa.array(["probe"] * len(ids), pa.string()),
            "has_cue": pa.array([None] * len(ids), pa.bool_()),
        })


class ImageFolder(ImageSource):
    """Every file under `root`, recursively, in sorted order; image_id = the relative path with
    '/' separators. Hidden files and folders (starting with '.') are ignored; every other file is
    a candidate, and PIL decides by content, not extension, whether it is an image (a README in
    the folder is reported as 'not an image'). A file in a subfolder is labelled with the
    top-level subfolder's name (torchvision's ImageFolder layout, `photos/goldfish/1.jpg`):
    audits read it as a class (`classnames.class_map`)."""

    def __init__(self, root: str | os.PathLike, dataset: str | None = None, **kw):
        root = Path(root)
        if not root.is_dir():
            raise BadInput(f"Image folder '{root}' does not exist or is not a folder. Give a folder "
                           "of images (searched recursively).")
        self.root = root.resolve()
        files = sorted(_walk(self.root))
        if not files:
            raise BadInput(f"Image folder '{root}' has no files. Put images (jpg, png, ...) in it.")
        items = [(rel, str(self.root / rel)) for rel in files]
        labels = {rel: rel.split("/", 1)[0] for rel in files if "/" in rel}
        super().__init__(dataset or folder_dataset_id(self.root, files), items, labels=labels, **kw)

    def take(self, n: int) -> None:
        """Keep at most `n` files, spread evenly over the top-level subfolders (loose files are one
        more group): each group's first files in sorted order, a file from every group in turn, so
        `--max-images 5000` of ImageNet's val/ (1,000 class folders of 50) sees 5 of every class,
        not the first 100 classes. A larger `n` keeps every file a smaller one took."""
        if n >= len(self.items):
            return
        groups: dict[str, list[int]] = {}
        for i, (rel, _) in enumerate(self.items):
            groups.setdefault(self.labels.get(rel, ""), []).append(i)
        chosen: list[int] = []
        for rank in range(max(map(len, groups.values()))):
            chosen += [g[rank] for g in groups.values() if rank < len(g)]
            if len(chosen) >= n:
                break
        # the last round is cut in sorted group order; the items stay in sorted (disk) order
        self.items = [self.items[i] for i in sorted(chosen[:n])]


def _walk(root: Path) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for f in filenames:
            if not f.startswith("."):
                yield f if rel == "." else f"{rel}/{f}".replace(os.sep, "/")


def folder_dataset_id(root: Path, files: list[str]) -> str:
    """'<folder name>-<hash8>': the hash covers the absolute path, the relative paths and the
    file sizes, so the same folder gives the same id and a changed folder a new one."""
    h = hashlib.sha1(str(root).encode())
    for f in files:
        try:
            size = (root / f).stat().st_size
        except OSError:
            size = -1
        h.update(f"\0{f}\0{size}".encode())
    return f"{_slug(root.name)}-{h.hexdigest()[:8]}"


# ---- the probe set of a dissect ----------------------------------------------------------------

def probe_source(images, world, max_images: int | None = None) -> ImageSource:
    """The probe images: a folder, or the world's probe split; at most `max_images` of them when
    given (`ImageSource.take`: a folder's spread over its subfolders). The subset is recorded in the
    run's parameters."""
    source = _full_source(images, world)
    if max_images is not None:
        if max_images < 1:
            raise BadParameter(f"max_images={max_images} must be at least 1.")
        source.take(max_images)
    return source


def _full_source(images, world) -> ImageSource:
    if images is not None:
        return ImageFolder(images)
    if world is None:
        raise BadInput("No images to dissect on: give --images DIR (a folder of images) or a "
                       "probe-world model such as probe:cnn, whose probe images are used.")
    t = world.images()
    t = t.filter(pc.equal(t["split"], "probe"))
    return ImageSource.from_table(world.id, t)


class CellWindows:
    """encoder_iou's view of an image: `grid` x `grid` cells over the part of the image the
    target sees (its centre crop: `crop_fraction`, as patches.to_image_box), each seen through a
    window twice the cell's side centred on it (edge pixels repeated past the border), in the
    encoder's preprocessing, row by row; then each border cell's window again, shifted inside the
    image (border_cells order) -> [grid * grid + len(border_cells(grid)), 3, s, s]. Twice the
    cell: the encoder names what is around a point, not a few pixels (on the fast probe worlds,
    windows of the cell's own side labelled cells worse). Both at the border: repeated edge
    pixels turn a thin line along the edge (a frame) into a band the encoder does not call a
    frame, while a shifted window moves a corner object (a dot) off its centre, where the
    encoder no longer sees it; scorers.cell_concepts keeps the one that says more. A class, not
    a closure: DataLoader workers pickle it."""

    def __init__(self, preprocess: Callable[[Image.Image], torch.Tensor], grid: int, crop_fraction: float | None):
        self.preprocess, self.grid, self.crop_fraction = preprocess, grid, crop_fraction

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.preprocess(w) for w in self.windows(image)])

    def as_split(self) -> "SplitWindows | None":
        """The windows as uint8 from the workers, normalised a batch at once on the device, where
        the encoder's preprocessing splits so (SplitPreprocess): the same numbers, a quarter of
        the bytes (16 float windows of 224 px are 9.6 MB an image)."""
        s = SplitPreprocess.of(self.preprocess)
        return None if s is None else SplitWindows(s.pil, s.mean, s.std, self.windows)

    def windows(self, image: Image.Image) -> list[Image.Image]:
        im = image.convert("RGB")
        if self.crop_fraction is not None:   # resize + centre crop: the input shows a central square
            W, H = im.size
            side = self.crop_fraction * min(W, H)
            im = im.crop((round((W - side) / 2), round((H - side) / 2), round((W + side) / 2), round((H + side) / 2)))
        a = np.asarray(im)
        H, W = a.shape[:2]
        h, w = H / self.grid, W / self.grid
        py, px = int(np.ceil(h / 2)), int(np.ceil(w / 2))
        p = np.pad(a, ((py, py), (px, px), (0, 0)), mode="edge")
        out = []
        sh, sw = max(1, round(2 * h)), max(1, round(2 * w))
        for gy in range(self.grid):
            for gx in range(self.grid):
                y0, x0 = round(gy * h + py - h / 2), round(gx * w + px - w / 2)
                out.append(Image.fromarray(p[y0 : y0 + sh, x0 : x0 + sw]))
        ch, cw = min(H, sh), min(W, sw)
        for gy, gx in border_cells(self.grid):     # and the same window shifted inside the image
            y0 = min(max(round(gy * h - h / 2), 0), H - ch)
            x0 = min(max(round(gx * w - w / 2), 0), W - cw)
            out.append(Image.fromarray(a[y0 : y0 + ch, x0 : x0 + cw]))
        return out


@dataclass(frozen=True)
class SplitWindows(SplitPreprocess):
    """CellWindows in SplitPreprocess's two halves: `uint8(image)` -> [windows, 3, s, s] uint8 in a
    worker, `finish` -> [m, windows, 3, s, s] float32 normalised on the batch's device."""

    windows: Callable[[Image.Image], list] = None

    def uint8(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.pixels(w) for w in self.windows(image)]))

    def finish(self, batch: torch.Tensor) -> torch.Tensor:
        return super().finish(batch.flatten(0, 1)).view(batch.shape)


class ProbeMasks:
    """Per-pixel concept masks of the probe world, decoded per batch: [b, concepts, H, W] bool."""

    def __init__(self, world, concepts: Sequence[str]):
        self.decode = rle_decode
        t = world.masks()
        self.index = {c: i for i, c in enumerate(concepts)}
        self.by_image: dict[str, list] = {}
        for iid, c, h, w, rle in zip(*(t[col].to_pylist() for col in ("image_id", "concept", "height", "width", "rle"))):
            if c in self.index:
                self.by_image.setdefault(iid, []).append((self.index[c], h, w, rle))
        self.present = sorted({ci for rows in self.by_image.values() for ci, *_ in rows})
        self.size = next(((h, w) for rows in self.by_image.values() for _, h, w, _ in rows), (1, 1))

    def batch(self, image_ids: Sequence[str]) -> torch.Tensor:
        """Masks at half the image resolution, as Network Dissection scores at half its input
        size (Broden's 112 px for 224 px): a quarter of the upsampling and IoU work, and the
        probe world's smallest concept (a few-pixel cue) still covers whole cells."""
        H, W = self.size
        out = torch.zeros(len(image_ids), len(self.index), H, W, dtype=torch.bool)
        for j, iid in enumerate(image_ids):
            for ci, h, w, rle in self.by_image.get(iid, []):
                out[j, ci] = torch.from_numpy(self.decode(rle, h, w).astype(bool))
        if H >= 32 and W >= 32:
            out = torch.nn.functional.interpolate(out.float(), size=(H // 2, W // 2), mode="area") >= 0.5
        return out
