"""Dissect a real architecture at real scale and compare it with the physical floor.

    .venv/bin/python bench/real_scale.py --images 32 --vocab english-3k --json
    .venv/bin/python bench/real_scale.py --images 2000 --vocab english-20k --device cuda --json
    .venv/bin/python bench/real_scale.py --images 256 --layers layer4 --cold-only --workdir DIR
    .venv/bin/python bench/real_scale.py --images 256 --layers layer4 --warm-only --workdir DIR --json

Real architectures with random weights (no downloads): torchvision resnet50, layers conv1,
layer1..layer4 (3,904 units), the OpenCLIP ViT-B-32 encoder, scorers patch, soft_wpmi, wpmi,
cos_cubed, on N generated JPEG images of 500x375 px. In the same run it times the floor:
(a) the target's plain forward over the N images, (b) the encoder's plain image forward over
them, (c) the encoder's plain forward over the unique crops the dissect cut, (d) the plain text
encoding of the vocabulary; then the dissect cold (empty store) and warm (the same dissect with
another scorer set, which reuses every embedding), and the peak RSS of a cold dissect at N and
at 4N images (each in a fresh process). Targets: cold / (a+b+c+d) <= 1.25; warm / (a) <= 1.5
with zero text, image and crop encodings (also given without the seconds loading the two models,
which a dissect pays and the plain forward does not); RSS beyond the pooled activations flat
within 10%.
Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neurostore.devices import autocast, describe, resolve_device, resolve_precision  # noqa: E402
from neurostore.encoders import load_encoder  # noqa: E402
from neurostore.images import ImageFolder  # noqa: E402
from neurostore.models import load_target  # noqa: E402
from neurostore.pipeline import dissect  # noqa: E402
from neurostore.store import Store  # noqa: E402
from neurostore.vocab import load_vocabulary  # noqa: E402

SCORERS = ["patch", "soft_wpmi", "wpmi", "cos_cubed"]
LAYERS = ["conv1", "layer1", "layer2", "layer3", "layer4"]


@functools.lru_cache(maxsize=1)  # one tile per process
def _noise(seed: int) -> np.ndarray:
    """A 1024 x 1024 grain tile the images take shifted windows of (drawing fresh noise for every
    photo-sized image was most of the generation time)."""
    return np.random.default_rng(seed).normal(0, 12, (1024, 1024, 3)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32) / 500.0
    return yy, xx


def _make_image(args) -> None:
    path, seed, i = args
    rng = np.random.default_rng([seed, i])
    yy, xx = _grid()
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    t = ((np.sin(xx * np.float32(rng.uniform(2, 9)) + yy * np.float32(rng.uniform(2, 9))) + 1) / 2)[..., None]
    oy, ox = rng.integers(0, 1024 - 375), rng.integers(0, 1024 - 500)
    a = (c0 * t + c1 * (1 - t) + _noise(seed)[oy : oy + 375, ox : ox + 500]).clip(0, 255)
    im = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(rng.integers(2, 7)):
        x, y, r = rng.integers(0, 500), rng.integers(0, 375), rng.integers(15, 120)
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        shape((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    im.save(path, quality=90)


def make_images(folder: Path, n: int, seed: int = 0, workers: int = 0) -> None:
    """n photo-sized JPEGs: smooth colour fields with shapes and grain (deterministic: image i
    depends on (seed, i) only), written by `workers` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{i:06d}.jpg", seed, i) for i in range(n)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_make_image, jobs, chunksize=64)
    else:
        for j in jobs:
            _make_image(j)


def load_models(args):
    """The dissect's models: random weights are seeded at load (the same in every process)."""
    target = load_target(args.model).to(args.device, args.precision)
    return target, load_encoder(args.encoder, device=args.device, precision=args.precision)


@torch.no_grad()
def floors(args, folder: Path, store: Path, dev, dtype) -> dict:
    """Plain forwards, no neurostore work around them: (a) target, (b) encoder images, (c) the
    unique crops of the dissect in `store`, (d) the vocabulary's texts. Also the seconds loading
    both models takes (outside the floor: a dissect pays it, the plain forwards do not)."""
    t = time.time()
    target, enc = load_models(args)
    out = {"load_models_s": time.time() - t}
    out["a_target_forward_s"] = target_forward(target, args, folder, dev, dtype)
    src = ImageFolder(folder)
    t = time.time()
    for b in src.batches(enc.split_preprocess() or enc.preprocess, args.batch_size, num_workers=args.workers,
                         device=dev):
        enc.encode_images(b.pixels)
    out["b_encoder_images_s"] = time.time() - t
    rows = Store.open(store).sql("SELECT image_id, x0, y0, x1, y1 FROM patches ORDER BY image_id").to_pylist()
    by_image: dict = {}
    for r in rows:
        by_image.setdefault(r["image_id"], []).append((r["x0"], r["y0"], r["x1"], r["y1"]))

    # the crops as uint8, normalised a batch at a time on the device, as a fast plain pipeline
    # would (and the dissect does): the floor must not be slower than the dissect's own way
    split = enc.split_preprocess()

    def crops(item):  # one image decoded, its crops cut: m x [3, S, S]
        im = src.load(item[0])
        return [split.pixels(im.crop(box)) if split else enc.preprocess(im.crop(box)) for box in item[1]]

    def encode(chunk):
        enc.encode_images(split.batch(chunk, enc.device) if split else torch.stack(chunk))

    from concurrent.futures import ThreadPoolExecutor

    t = time.time()
    batch = []
    with ThreadPoolExecutor(max(1, args.workers)) as pool:
        for got in pool.map(crops, by_image.items()):
            batch += got
            while len(batch) >= args.batch_size:
                encode(batch[: args.batch_size])
                batch = batch[args.batch_size :]
    if batch:
        encode(batch)
    out["c_encoder_crops_s"], out["crops"] = time.time() - t, len(rows)
    concepts = load_vocabulary(args.vocab).concepts
    t = time.time()
    for i in range(0, len(concepts), 256):
        enc.encode_texts(concepts[i : i + 256])
    out["d_texts_s"] = time.time() - t
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def run_dissect(args, folder: Path, store: Path, scorers=SCORERS):
    return dissect(store, args.model, images=folder, layers=args.layers, vocabulary=args.vocab,
                   scorers=scorers, encoder=args.encoder, batch_size=args.batch_size, device=args.device,
                   precision=args.precision, workers=args.workers, progress=not args.quiet,
                   log=lambda m: print(m, file=sys.stderr))


@torch.no_grad()
def target_forward(target, args, folder: Path, dev, dtype) -> float:
    """(a): seconds of the target's plain forward over the images, no neurostore work around it
    (the pixels made as the dissect makes them: uint8 from the workers, normalised on the device)."""
    t = time.time()
    for b in ImageFolder(folder).batches(target.preprocess, args.batch_size, num_workers=args.workers, device=dev):
        with autocast(dev, dtype):
            target.module(b.pixels)
    return time.time() - t


def warm_only(args, root: Path, dev, dtype) -> None:
    """The warm dissect of a kept cold store, divided by the mean of a plain forward (a) just before
    and just after it: on a shared machine the load moves within minutes."""
    folder, store = root / "images", root / "store"
    if not (store / "store.json").is_file():
        raise SystemExit(f"--warm-only needs --workdir with a cold dissect in it; {store} has none.")
    target, _ = load_models(args)
    a0 = target_forward(target, args, folder, dev, dtype)
    t = time.time()
    warm = run_dissect(args, folder, store, scorers=["patch", "cos_cubed"])
    warm_s = time.time() - t
    a1 = target_forward(target, args, folder, dev, dtype)
    a = (a0 + a1) / 2
    print(json.dumps({"bench": "real_scale", "device": describe(dev), "images": args.images, "layers": args.layers,
                      "vocab": args.vocab, "warm_s": round(warm_s, 2), "warm_timings": warm["timings"],
                      "warm_passes": warm["passes"], "a_target_forward_s": [round(a0, 2), round(a1, 2)],
                      "warm_over_target_forward": round(warm_s / a, 3), "target_warm_over_target_forward": 1.5,
                      "warm_encodings": sum(warm["passes"][k] for k in ("encoded_texts", "encoded_images",
                                                                        "encoded_crops"))}))


def rss_of_cold_dissect(args, n: int, root: Path) -> dict:
    """Peak RSS (MB) of a cold dissect of n images, in a fresh process."""
    folder = root / f"images-{n}"
    make_images(folder, n, workers=args.workers)
    cmd = [sys.executable, __file__, "--_child", str(folder), "--images", str(n), "--vocab", args.vocab,
           "--device", args.device, "--precision", args.precision, "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--model", args.model, "--encoder", args.encoder, "--quiet",
           "--layers", *args.layers]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _beyond(a: dict, b: dict) -> float:
    """Peak RSS at 4N over N, the pooled activations (which must grow with N) taken out of both."""
    return round((b["peak_rss_mb"] - b["pooled_mb"]) / (a["peak_rss_mb"] - a["pooled_mb"]), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--layers", nargs="+", default=LAYERS)
    ap.add_argument("--vocab", default="english-3k")
    ap.add_argument("--model", default="torchvision:resnet50@random")
    ap.add_argument("--encoder", default="open_clip:ViT-B-32/random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--no-rss", action="store_true", help="Skip the peak-RSS runs at N and 4N.")
    ap.add_argument("--cold-only", action="store_true",
                    help="Only the cold dissect and the target's plain forward (a) (a short device lease).")
    ap.add_argument("--rss-only", action="store_true", help="Only the peak-RSS runs at N and 4N.")
    ap.add_argument("--workdir", help="Keep the images and the store here (default: a temporary folder).")
    ap.add_argument("--warm-only", action="store_true",
                    help="With --workdir holding a cold dissect: only the warm dissect, between two plain target "
                         "forwards (a) whose mean it is divided by, so both see the same machine load.")
    ap.add_argument("--quiet", action="store_true", help="No progress bars.")
    ap.add_argument("--json", action="store_true", help="Only the JSON line on stdout.")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:  # one cold dissect, report peak RSS
        with tempfile.TemporaryDirectory() as d:
            s = run_dissect(args, Path(args._child), Path(d) / "store")
        units = s["units"]
        print(json.dumps({"images": s["images"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          # pooled activations held for the scorers: mean and max, float16 + float32 table
                          "pooled_mb": s["images"] * units * 2 * (2 + 4) / 2**20}))
        return
    dev = resolve_device(args.device)
    dtype = resolve_precision(args.precision, dev)
    if args.rss_only:
        with tempfile.TemporaryDirectory() as d:
            a, b = rss_of_cold_dissect(args, args.images, Path(d)), rss_of_cold_dissect(args, 4 * args.images, Path(d))
        print(json.dumps({"bench": "real_scale", "device": describe(dev), "images": args.images, "layers": args.layers,
                          "vocab": args.vocab, "peak_rss_mb": {"n": round(a["peak_rss_mb"]), "4n": round(b["peak_rss_mb"])},
                          "pooled_mb": {"n": round(a["pooled_mb"], 1), "4n": round(b["pooled_mb"], 1)},
                          "rss_beyond_pooled_ratio": _beyond(a, b), "target_ratio": 1.10}))
        return
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    if args.warm_only:
        return warm_only(args, Path(args.workdir), dev, dtype)
    with (contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory()) as d:
        root = Path(d)
        folder = root / "images"
        t = time.time()
        if not folder.is_dir():
            make_images(folder, args.images, workers=args.workers)
        print(f"[real_scale] {args.images} images made in {time.time() - t:.1f} s", file=sys.stderr, flush=True)
        t = time.time()
        cold = run_dissect(args, folder, root / "store")
        cold_s = time.time() - t
        # each phase as it ends (a run cut short by a time limit still says what it measured)
        print(f"[real_scale] cold {cold_s:.1f} s {json.dumps(cold['timings'])} {json.dumps(cold['passes'])}",
              file=sys.stderr, flush=True)
        if args.cold_only:
            a = target_forward(load_models(args)[0], args, folder, dev, dtype)
            print(json.dumps({"bench": "real_scale", "device": describe(dev), "images": args.images,
                              "units": cold["units"], "vocab": args.vocab, "concepts": cold["concepts"],
                              "cold_s": round(cold_s, 2), "cold_timings": cold["timings"], "cold_passes": cold["passes"],
                              "images_per_s_cold": round(args.images / cold_s, 2), "a_target_forward_s": round(a, 2),
                              "cold_over_target_forward": round(cold_s / a, 3), "target_cold_50k_gpu_s": 120}))
            return
        t = time.time()
        warm = run_dissect(args, folder, root / "store", scorers=["patch", "cos_cubed"])
        warm_s = time.time() - t
        print(f"[real_scale] warm {warm_s:.1f} s {json.dumps(warm['timings'])} {json.dumps(warm['passes'])}",
              file=sys.stderr, flush=True)
        fl = floors(args, folder, root / "store", dev, dtype)
        print(f"[real_scale] floor {json.dumps(fl)}", file=sys.stderr, flush=True)
        floor_s = fl["a_target_forward_s"] + fl["b_encoder_images_s"] + fl["c_encoder_crops_s"] + fl["d_texts_s"]
        rss = {}
        if not args.no_rss:
            rss = {"n": rss_of_cold_dissect(args, args.images, root), "4n": rss_of_cold_dissect(args, 4 * args.images, root)}
    say(f"device {describe(dev)}; {args.images} images, layers {' '.join(args.layers)} ({cold['units']} units), "
        f"vocabulary {args.vocab} ({cold['concepts']}), encoder {args.encoder}")
    say(f"floor: {fl}")
    say(f"cold: {cold_s:.1f} s {cold['timings']} passes {cold['passes']}")
    say(f"warm: {warm_s:.1f} s {warm['timings']} passes {warm['passes']}")
    # 50k images: the pass and scoring grow with the images; the crops grow with them only up to
    # units x k (then every unit's top-k boxes exist); the vocabulary does not grow.
    t = cold["timings"]
    per_image = (t.get("record", 0) + t.get("scores", 0) + t.get("store", 0)) / args.images
    per_crop = t.get("patches", 0) / max(1, cold["passes"]["encoded_crops"])
    crops_50k = min(cold["units"] * 10, cold["passes"]["encoded_crops"] / args.images * 50_000)
    result = {
        "bench": "real_scale", "device": describe(dev), "images": args.images, "units": cold["units"],
        "vocab": args.vocab, "concepts": cold["concepts"], "floor": fl, "floor_s": round(floor_s, 2),
        "cold_s": round(cold_s, 2), "warm_s": round(warm_s, 2),
        "cold_timings": cold["timings"], "warm_timings": warm["timings"],
        "cold_passes": cold["passes"], "warm_passes": warm["passes"],
        "images_per_s_cold": round(args.images / cold_s, 2), "images_per_s_warm": round(args.images / warm_s, 2),
        "cold_over_floor": round(cold_s / floor_s, 3),
        "warm_over_target_forward": round(warm_s / fl["a_target_forward_s"], 3),
        # the same without loading the two models, which (a) leaves out and a dissect cannot
        "warm_less_loading_over_target_forward": round((warm_s - fl["load_models_s"]) / fl["a_target_forward_s"], 3),
        "warm_encodings": warm["passes"]["encoded_texts"] + warm["passes"]["encoded_images"] + warm["passes"]["encoded_crops"],
        # linear in the images beyond the vocabulary (an upper bound: crops saturate at units x k)
        "extrapolated_50k_cold_s": round(t.get("vocabulary", 0) + per_image * 50_000 + per_crop * crops_50k),
    }
    if rss:
        a, b = rss["n"], rss["4n"]
        result["peak_rss_mb"] = {"n": round(a["peak_rss_mb"]), "4n": round(b["peak_rss_mb"])}
        result["rss_beyond_pooled_ratio"] = _beyond(a, b)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
