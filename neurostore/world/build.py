"""Build a probe world from nothing (scenes, images, masks, target models, encoder) into a cache
folder keyed by a hash of the generator version and every parameter.

A second build with the same parameters is a cache hit (just reads world.json); any changed
parameter gives a new key and a new folder. A build happens in a temporary folder next to the
final one and is renamed into place at the end, so an interrupted build leaves nothing that
looks finished. The builder holds a lock on its temporary folder: a killed build's folder
(nobody holds its lock) is removed by the next build, and its worker process exits with it.

Worlds train on the CPU by default: one thread, deterministic kernels and the same kernels
whatever the CPU offers make the weights bit-identical across machines. torch and oneDNN choose
their kernels by the CPU's instruction set (AVX-512 where it has it, else AVX2), the two round
differently, and training amplifies the last bits into another world (measured: the default
world's CNN at 0.963 clean accuracy and 0.756 cue flip rate built on an AVX-512 CPU, 0.965 and
0.773 on an AVX2 one, and the calibration bench's figures moved with it). So a CPU build runs in
a spawned process whose kernels are capped at AVX2 (PORTABLE_KERNELS, which says what is not
capped: read once, when the libraries load, so they cannot be set in a process that already has
torch). `device="cuda"` trains the target models on the GPU: faster, but
not bit-identical, so it is a different world (its own key and folder).

torch (and the modules that train with it: train, targets, encoder, neurostore.devices) is
imported inside the functions that train: a cache hit, what every `load_world` is, never pays
for importing torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import pickle
import platform
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ..errors import BadParameter, unknown
from ..progress import bar as progress_bar
from ..signals import sigterm_exits
from ..store import _staging_is_dead
from ..textembed import get_text_embedder
from . import generate as gen

# Bump when training changes in a way that changes the artefacts (it is part of the cache key).
TRAINER_VERSION = "4"
# Bump when the `poly` layer's detectors change (part of the key of polysemantic worlds only, so
# an older polysemantic world is rebuilt, not reused with stale detectors). 2: trained twice as
# long and scaled by their per-image peaks on the probe images (1, unversioned: by all training cells).
POLY_VERSION = "2"
TARGET_NAMES = ["cnn", "vit", "control"]
# The kernels every CPU build uses (module doc): at most AVX2, which every x86-64 CPU of the last
# decade has, for torch's own kernels and oneDNN's (convolutions). Measured on an AVX-512 AMD EPYC:
# so capped, it builds the worlds the README's figures were measured on, on an earlier machine
# (the default world's CNN accuracies and the fast world's calibration figures equal to the last
# digit). MKL (matrix products) is left to choose: capping it too (MKL_ENABLE_INSTRUCTIONS=AVX2,
# or MKL_CBWR=AVX2, its reproducibility branch) trained another ViT there, so MKL's own choice
# already agreed; an Intel CPU's MKL may still build other worlds.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

# The probe ViT: timm VisionTransformer on an 8×8 token grid (8-px patches at 64 px) with a conv
# patch stem. With plain linear patches it reached only 0.59–0.85 clean accuracy in 10 epochs,
# whatever the batch size, learning rate, width or augmentation; the conv stem gives 0.95–0.99 in 5.
VIT = {"dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0, "lr": 1e-3, "batch_size": 32}

# P(cue | cue class) in training, and the CNNs' training length. How much a model leans on a
# cue depends on the cue, the class, the model and how long it trains (a model that trains on
# drops the cue for the shape); 0.9 and 3 CNN epochs put every combination measured inside the
# targets (clean accuracy >= 0.90, flip rate >= 0.10). On 8000 scenes (clean accuracy / flip):
#   CNN, 3 epochs:  watermark/star 0.956/0.68, dot/star 0.966/0.70, frame/star 0.969/0.58,
#                   dot/ring 0.996/0.21 (seed 1), 0.999/0.21 (seed 2),
#                   frame/triangle 0.999/0.37 (seed 2), 0.989/0.30 (seed 1)
#   CNN, 5 epochs:  dot/ring 1.0/0.05 (seed 1), frame/triangle 0.999/0.08 (seed 2): too long
#   ViT, 5 epochs:  watermark/star 0.946/0.59, dot/ring 0.984/0.36, frame/triangle 0.966/0.89,
#                   frame/star 0.91/0.99 (7 epochs: 0.948/0.99)
# Stronger cues leave slow shapes unlearned (dot/star at 0.99: CNN 0.85 clean); weaker ones let
# quick shapes drop the cue (frame/triangle at 0.85: CNN flip 0.05).
DEFAULT_CUE_STRENGTH = 0.9


@dataclass(frozen=True)
class WorldConfig:
    """Every parameter of a probe world; all of them go into the cache key."""

    seed: int = 0
    size: int = 64                 # image side in pixels (multiple of 8: ViT patches are 8 px)
    n_images: int = 8000           # training scenes
    n_test: int = 1000             # paired test scenes (each rendered without and with the cue)
    n_probe: int = 3000            # held-out probe images for dissection
    cue_kind: str = "watermark"    # watermark | dot | frame
    cue_class: str = "star"        # the class the cue co-occurs with in training (in a shape-colour
                                   # world a bare shape means its first class: star -> "red star")
    cue_strength: float = DEFAULT_CUE_STRENGTH  # P(cue | cue class) in training (other
                                                # classes never carry it)
    cnn_epochs: float = 3.0        # training length of the CNN and the control CNN
    vit_epochs: float = 6.0        # ViT (batches of 32; see VIT)
    encoder_images: int = 2500     # training scenes the encoder's crops come from
    encoder_epochs: float = 5.0    # (4: loose-box shape accuracy 0.897 on seed 2, 5: 0.933)
    train_device: str = "cpu"      # where the targets trained: cpu (bit-identical everywhere), cuda or
                                   # mps (faster, not bit-identical: a world of its own); set by build()
    classes: str = "shape"         # "shape" (6 classes) or "shape-colour" (24: "red circle", ...)
    polysemantic: bool = False     # give the CNN a `poly` layer of units that each detect two
                                   # unrelated concepts (generate.POLY_PAIRS), their truth sets

    @classmethod
    def fast(cls, **overrides) -> "WorldConfig":
        """Small variant for tests and quick looks: same world, fewer images, shorter training."""
        base = dict(n_images=2000, n_test=300, n_probe=300, cnn_epochs=10.0, vit_epochs=8.0,
                    encoder_images=1500, encoder_epochs=3.0)
        base.update(overrides)
        return cls(**base)

    def validate(self) -> "WorldConfig":
        def bad(name, value, valid):
            raise BadParameter(f"Invalid {name} {value!r}: {valid}. Fix the option and rebuild.")

        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", self.seed, "use an integer >= 0")
        if not (32 <= self.size <= 256) or self.size % 8:
            bad("size", self.size, "use a multiple of 8 between 32 and 256")
        if self.n_images < 60:
            bad("n_images", self.n_images, "use at least 60 training images")
        if self.n_test < 12:
            bad("n_test", self.n_test, "use at least 12 test scenes")
        if self.n_probe < 1:
            bad("n_probe", self.n_probe, "use at least 1 probe image")
        if self.cue_kind not in gen.CUE_KINDS:
            raise BadParameter(unknown("cue kind", self.cue_kind, gen.CUE_KINDS,
                                       "Pass one of them with --cue-kind."))
        if self.classes not in gen.CLASS_SETS:
            raise BadParameter(unknown("class set", self.classes, gen.CLASS_SETS,
                                       "Pass one of them with --classes."))
        if self.cue_label not in gen.class_names(self.classes):
            raise BadParameter(unknown("cue class", self.cue_class, gen.class_names(self.classes),
                                       "Pass one of them with --cue-class."))
        if not isinstance(self.cue_strength, (int, float)) or not (0.0 < self.cue_strength <= 1.0):
            bad("cue_strength", self.cue_strength, "use a probability in (0, 1]")
        for name in ("cnn_epochs", "vit_epochs", "encoder_epochs"):
            if not getattr(self, name) > 0:
                bad(name, getattr(self, name), "use a positive number of epochs")
        if self.encoder_images < 10:
            bad("encoder_images", self.encoder_images, "use at least 10 images")
        if self.train_device not in ("cpu", "cuda", "mps"):
            bad("train_device", self.train_device, "use cpu, cuda or mps (build()'s device= sets it)")
        return self

    @property
    def cue_label(self) -> str:
        """The class name the cue co-occurs with (a bare shape in a shape-colour world names its
        first class)."""
        if self.classes == "shape-colour" and self.cue_class in gen.SHAPES:
            return f"{gen.CLASS_COLOURS[0]} {self.cue_class}"
        return self.cue_class

    def key(self) -> str:
        """Hex digest of generator and trainer versions and every parameter."""
        payload = {"generator": gen.GENERATOR_VERSION, "trainer": TRAINER_VERSION,
                   **asdict(self)}
        # Options added later leave the key out at their default, so existing worlds keep their keys.
        for name, default in (("train_device", "cpu"), ("classes", "shape"), ("polysemantic", False)):
            if payload[name] == default:
                del payload[name]
        if self.polysemantic:
            payload["poly"] = POLY_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_cache() -> Path:
    return Path(os.environ.get("NEUROSTORE_CACHE") or Path.home() / ".cache" / "neurostore")


def world_dir(config: WorldConfig, cache: str | Path | None = None) -> Path:
    root = Path(cache) if cache is not None else default_cache()
    return root / "worlds" / config.key()[:16]


@contextlib.contextmanager
def _torch_settings(threads: int = 1, deterministic: bool = True):
    """At most `threads` threads and (on the CPU) deterministic kernels while building; restored
    afterwards. GPU builds are not bit-identical anyway, and CUDA's deterministic mode needs
    CUBLAS_WORKSPACE_CONFIG set before start-up."""
    import torch

    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(min(threads, old_threads))
    torch.use_deterministic_algorithms(deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def cue_assignment(labels: np.ndarray, config: WorldConfig, rng: np.random.Generator,
                   correlated: bool = True) -> np.ndarray:
    """Who carries the cue. Correlated: a fraction cue_strength of the cue class, no one else.
    Independent (control): the same overall rate, spread over all classes alike."""
    ci = gen.class_names(config.classes).index(config.cue_label)
    u = rng.uniform(size=len(labels))
    if correlated:
        return (labels == ci) & (u < config.cue_strength)
    return u < config.cue_strength * float(np.mean(labels == ci))


def _steps(job: dict) -> int:
    from .train import n_steps

    return n_steps(job["epochs"], len(job["x"]), job["fit"]["batch_size"])


def _fit_target(*, arch: dict, x: np.ndarray, y: np.ndarray, epochs: float, fit: dict, seed: int,
                size: int, test: tuple, path: Path, n_classes: int = len(gen.SHAPES), device: str = "cpu",
                counter=None, on_step=None) -> dict:
    """Train one target model on one thread (on `device`), save it to `path` and measure it on the
    paired test scenes. Runs in the building process or in a worker process (which counts its
    steps in the shared `counter`, for the progress bar in the building process)."""
    import torch

    from . import targets as tg

    t0, c0 = time.perf_counter(), time.process_time()
    dev = torch.device(device)
    with _torch_settings(1, deterministic=dev.type == "cpu"):
        if counter is not None:
            def on_step(k: int) -> None:
                counter.value += k
        torch.manual_seed(seed)
        model = tg.make_target(arch, n_classes, size).to(dev)
        tg.train_target(model, torch.from_numpy(x).to(dev), torch.from_numpy(y.astype(np.int64)).to(dev),
                        epochs=epochs, seed=seed, on_step=on_step, **fit)
        torch.save({"arch": arch, "weights": {k: v.cpu() for k, v in model.state_dict().items()}}, path)
        clean, cued, labels, cue_index = test
        metrics = tg.cue_metrics(model, torch.from_numpy(clean).to(dev), torch.from_numpy(cued).to(dev),
                                 torch.from_numpy(labels.astype(np.int64)).to(dev), cue_index)
    metrics["train_s"] = round(time.perf_counter() - t0, 2)
    metrics["train_cpu_s"] = round(time.process_time() - c0, 2)
    return metrics


def _exit_with_parent() -> None:
    """Make this worker process exit as soon as the building process is gone, however it ended
    (SIGKILL included): an orphaned worker would otherwise train on at full CPU for minutes."""
    parent = multiprocessing.parent_process()  # its sentinel becomes ready when the parent exits
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="neurostore-watch-parent").start()


def _child_main(conn, fn, kwargs: dict) -> None:
    """Entry point of a spawned process (a target's training, a whole build): fn(**kwargs), sent
    back as ("ok", its result) or ("error", the exception; as text where it does not pickle). It
    exits as soon as the process that started it is gone."""
    _exit_with_parent()
    try:
        conn.send(("ok", fn(**kwargs)))
    except BaseException as e:  # noqa: BLE001 - reported to the starting process, which raises
        try:
            pickle.loads(pickle.dumps(e))  # it must unpickle over there too
            conn.send(("error", e))
        except Exception:  # noqa: BLE001 - an error that does not round-trip travels as its text
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))
    finally:
        conn.close()


class _Training:
    """The target models' training. Jobs named in `background` start in worker processes on
    entering (spawned, not forked: a fork of a process that has run torch's thread pool can
    hang); the others run here, one by one, through train_here(). results() waits for all.
    Leaving on an error stops the workers at once."""

    def __init__(self, jobs: dict, background: list[str], folder: Path, progress: bool):
        self.jobs, self.background, self.folder, self.progress = jobs, background, folder, progress
        self.metrics: dict[str, dict] = {}
        self.workers: dict = {}  # name -> (process, connection, step counter, bar)

    def __enter__(self) -> "_Training":
        ctx = multiprocessing.get_context("spawn")
        for name in self.background:
            counter = ctx.RawValue("q", 0)
            here, there = ctx.Pipe(duplex=False)
            job = dict(self.jobs[name], path=self.folder / f"{name}.pt")
            proc = ctx.Process(target=_child_main, args=(there, _fit_target, dict(job, counter=counter)), daemon=True,
                               name=f"neurostore-train-{name}")
            proc.start()
            there.close()  # so that a worker that dies shows as end-of-file here
            bar = progress_bar(_steps(job), f"world: train {name}", enabled=self.progress)
            self.workers[name] = (proc, here, counter, bar)
        return self

    def __exit__(self, *exc) -> None:
        for proc, conn, _, bar in self.workers.values():
            if proc.is_alive():
                proc.terminate()
            proc.join()
            conn.close()
            bar.close()

    def poll(self) -> None:
        """Move the workers' progress bars."""
        for _, _, counter, bar in self.workers.values():
            bar.update(counter.value - bar.n)

    def train_here(self, name: str) -> None:
        job = dict(self.jobs[name], path=self.folder / f"{name}.pt")
        with progress_bar(_steps(job), f"world: train {name}", enabled=self.progress) as bar:
            def step(k: int) -> None:
                bar.update(k)
                self.poll()
            self.metrics[name] = _fit_target(on_step=step, **job)

    def results(self) -> dict[str, dict]:
        """Metrics of every job, in the jobs' order, once the workers are done."""
        for name, (proc, conn, _, _) in self.workers.items():
            while not conn.poll(0.2):
                self.poll()
            try:
                status, value = conn.recv()
            except EOFError:
                proc.join()
                raise RuntimeError(f"Training the {name} target in a worker process failed (exit "
                                   f"code {proc.exitcode}); rerun the build.") from None
            if status != "ok":
                raise RuntimeError(f"Training the {name} target failed in its worker process: "
                                   f"{type(value).__name__}: {value}")
            self.metrics[name] = value
        self.poll()
        return {name: self.metrics[name] for name in self.jobs}


def build(config: WorldConfig | None = None, cache: str | Path | None = None, *,
          progress: bool = True, force: bool = False, device: str = "cpu") -> Path:
    """Build the probe world of `config` unless the cache has it; returns its folder (what
    neurostore.world.build_world opens as a World). `device` (see neurostore.devices) is where the
    target models train: the CPU by default, whose weights are bit-identical on every machine; a
    GPU is faster but not bit-identical (a world of its own)."""
    config = replace(config or WorldConfig(), train_device=device_type(device)).validate()
    final = world_dir(config, cache)
    _remove_dead_builds(final.parent)  # on a cache hit too: a killed build's folder can hold GBs
    if (final / "world.json").exists() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _one_builder(final, progress):
        if (final / "world.json").exists() and not force:  # built by the process we waited for
            return final
        return _build_once(config, final, progress, force, device)


@contextlib.contextmanager
def _one_builder(final: Path, progress: bool):
    """Hold the world's build lock: two processes asking for the same missing world (two demos,
    parallel test workers) build it once, the second waiting for the first and then reading it."""
    fd = os.open(final.parent / f".{final.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"world: another process is building {final.name}; waiting for it", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_once(config: WorldConfig, final: Path, progress: bool, force: bool, device: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{final.name}-", dir=final.parent))
    lock = os.open(tmp / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while this process lives: the folder is not garbage
        kernels = _portable_kernels(config)
        with sigterm_exits():
            if kernels:
                _build_in_process_with(kernels, tmp, config, progress)
            else:
                with _torch_settings(1, deterministic=config.train_device == "cpu"):
                    _build_into(tmp, config, progress, "cpu" if device == "cpu" else str(_resolve(device)))
        if force and final.exists():
            shutil.rmtree(final)
        os.unlink(tmp / ".lock")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same world first: keep theirs
            if not (final / "world.json").exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return final


def _portable_kernels(config: WorldConfig) -> dict[str, str]:
    """The environment a build's process needs for the same kernels on every CPU: PORTABLE_KERNELS
    for a CPU build on x86-64, nothing elsewhere (GPU builds are not bit-identical anyway; other
    CPUs have no such choice of kernels to make)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return dict(PORTABLE_KERNELS) if config.train_device == "cpu" and x86 else {}


def _build_in_process_with(env: dict[str, str], tmp: Path, config: WorldConfig, progress: bool) -> None:
    """_build_into in a spawned process whose environment adds `env` (read when its libraries
    load); its errors are raised here. Leaving early (Ctrl-C, SIGTERM) stops it first, so the
    caller can remove the folder it was writing."""
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe(duplex=False)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the child's environment is this one, as it is when it starts
    try:
        # not a daemon: a daemonic process may not start the ViT's worker
        proc = ctx.Process(target=_child_main, args=(there, _build_cpu, dict(tmp=tmp, config=config, progress=progress)),
                           name="neurostore-build-world")
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    there.close()  # so that a child that dies shows as end-of-file here
    answered = False
    try:
        try:
            status, value = here.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"Building the probe world in its process failed (exit code {proc.exitcode}); "
                               "rerun the build.") from None
        answered = True
        if status != "ok":
            raise value
    finally:
        if not answered and proc.is_alive():
            proc.terminate()  # SIGTERM: it stops its own worker and exits as on Ctrl-C
        proc.join()
        here.close()


def _build_cpu(tmp: Path, config: WorldConfig, progress: bool) -> None:
    """A CPU build, in the process _build_in_process_with starts."""
    with sigterm_exits(), _torch_settings(1, deterministic=True):
        _build_into(tmp, config, progress, "cpu")


def _resolve(device: str):
    from ..devices import resolve_device

    return resolve_device(device)


def device_type(device: str) -> str:
    """'cpu', 'cuda' or 'mps' for a --device spec; plain 'cpu' without importing torch, so that a
    cache hit stays instant."""
    return "cpu" if device == "cpu" else _resolve(device).type


def _remove_dead_builds(worlds: Path) -> None:
    """Delete the temporary folders of builds that were killed (SIGKILL, power loss): a folder
    whose lock nobody holds, as the store decides for its staging folders."""
    candidates = [d for d in worlds.glob(".building-*") if d.is_dir()]  # (a missing folder has none)
    if candidates:
        for d in candidates:
            if _staging_is_dead(d):
                shutil.rmtree(d, ignore_errors=True)


def _split_seeds(seed: int) -> dict[str, np.random.Generator]:
    names = ["train", "test", "probe", "cue", "control", "encoder", "eval"]
    seqs = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.default_rng(s) for n, s in zip(names, seqs)}


def _build_into(root: Path, config: WorldConfig, progress: bool, device: str) -> None:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    S = config.size
    rngs = _split_seeds(config.seed)
    key = config.key()
    world_id = f"probe-{key[:8]}"
    template = gen.cue_template(config.cue_kind, S)
    class_names = gen.class_names(config.classes)
    ci = class_names.index(config.cue_label)

    # ---- scenes and pixels --------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    counts = {"train": config.n_images, "test": config.n_test, "probe": config.n_probe}
    scenes = {s: gen.sample_scenes(rngs[s], n, S) for s, n in counts.items()}
    if config.classes == "shape-colour":
        for sc in scenes.values():
            gen.restrict_main_colour(sc)
    base, objmap = {}, {}
    for s in counts:
        base[s], objmap[s] = gen.render(scenes[s], S)
    labels = {s: gen.class_labels(scenes[s], config.classes) for s in counts}
    has_cue = {
        "train": cue_assignment(labels["train"], config, rngs["cue"]),
        "probe": cue_assignment(labels["probe"], config, rngs["cue"]),
    }
    control_cue = cue_assignment(labels["train"], config, rngs["control"], correlated=False)
    np.savez_compressed(root / "scenes.npz", **{f"{s}.{k}": v for s in counts for k, v in scenes[s].items()},
                        **{f"{s}.has_cue": v for s, v in has_cue.items()},
                        **{"train.control_has_cue": control_cue})

    # ---- target models: start the workers first, so they train while the images are written ----
    # Each model trains on one thread (tiny models gain little from intra-op threads, and one
    # thread makes the weights the same on every machine); with spare cores the ViT, the longest
    # job, trains in a worker process while this one writes the images and trains the rest.
    x_train = gen.apply_cue(base["train"], has_cue["train"], template)
    x_control = gen.apply_cue(base["train"], control_cue, template)
    cued = {"train": x_train, "test": gen.apply_cue(base["test"], np.ones(counts["test"], bool), template),
            "probe": gen.apply_cue(base["probe"], has_cue["probe"], template)}
    test = (base["test"], cued["test"], labels["test"], ci)
    # Training recipes (measured). ViT: batches of 32 learn more per CPU second than 128 (at
    # equal compute 0.59 vs 0.50 clean accuracy). CNNs: plain one-cycle AdamW; label smoothing
    # lowered the flip rate (watermark/star 0.07–0.19) and was dropped.
    cnn_arch = {"kind": "cnn", "widths": [16, 32, 64, 64], "norm": True}
    vit_arch = {"kind": "vit", "dim": VIT["dim"], "depth": VIT["depth"], "patch": 8,
                "heads": VIT["heads"], "mlp_ratio": VIT["mlp_ratio"], "pool": "avg", "stem": "conv"}
    cnn_fit = dict(lr=3e-3, batch_size=128, weight_decay=0.0)
    vit_fit = dict(lr=VIT["lr"], batch_size=VIT["batch_size"], weight_decay=0.05)
    jobs = {  # name: keyword arguments of _fit_target (seeds as in every earlier version)
        "cnn": dict(arch=cnn_arch, x=x_train, epochs=config.cnn_epochs, fit=cnn_fit, seed=config.seed * 101),
        "vit": dict(arch=vit_arch, x=x_train, epochs=config.vit_epochs, fit=vit_fit, seed=config.seed * 101 + 1),
        "control": dict(arch=cnn_arch, x=x_control, epochs=config.cnn_epochs, fit=cnn_fit,
                        seed=config.seed * 101 + 2),
    }
    for job in jobs.values():
        job.update(y=labels["train"], size=S, test=test, device=device, n_classes=len(class_names))
    (root / "targets").mkdir()
    cpus = os.cpu_count() or 1
    # On a GPU every model trains here, one after the other (the GPU runs one at a time anyway).
    background = [] if cpus < 2 or config.train_device != "cpu" else ["vit"] if cpus < 4 else list(jobs)
    summary: dict = {"id": world_id, "targets": {}, "encoder": {}}
    with _Training(jobs, background, root / "targets", progress) as training:
        n_images, n_masks = _write_images(root, world_id, config, scenes, base, cued, has_cue,
                                          labels, objmap, template, progress, training.poll)
        timings["generate_s"] = round(time.perf_counter() - t0, 2)
        timings["generate_cpu_s"] = round(time.process_time() - c0, 2)

        for name in jobs:
            if name not in background:
                training.train_here(name)

        # the encoder, while the workers train
        summary["encoder"] = _train_encoder(root, world_id, config, scenes, base, x_train, has_cue,
                                            objmap, template, rngs, progress, training.poll)

        summary["targets"] = training.results()

    if config.polysemantic:  # detectors on the trained CNN, saved into its file
        t0, c0 = time.perf_counter(), time.process_time()
        summary["polysemantic"] = _fit_poly(root / "targets" / "cnn.pt", config, x_train, scenes,
                                            objmap, base["test"], cued["probe"], len(class_names))
        summary["polysemantic"].update(train_s=round(time.perf_counter() - t0, 2),
                                       train_cpu_s=round(time.process_time() - c0, 2))

    timings["total_s"] = round(time.perf_counter() - t_start, 2)
    # CPU time of this process and of the workers (their training is all they do)
    worker_cpu = sum(summary["targets"][n]["train_cpu_s"] for n in background)
    timings["cpu_s"] = round(time.process_time() - cpu_start + worker_cpu, 2)
    # Wall time means little on a shared machine without the load it was measured under.
    timings["load_avg_1m"] = round(os.getloadavg()[0], 2)
    timings["cpus"] = os.cpu_count()
    timings["workers"] = len(background)
    timings["device"] = device
    if device == "cpu":  # the kernels it trained with (module doc): AVX2 on every x86-64 CPU
        import torch

        timings["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    summary["build"] = timings
    meta = {
        "id": world_id,
        "key": key,
        "generator_version": gen.GENERATOR_VERSION,
        "trainer_version": TRAINER_VERSION,
        "config": asdict(config),
        "classes": class_names,
        "concepts": {"shape": list(gen.SHAPES), "colour": list(gen.COLOUR_NAMES),
                     "texture": list(gen.TEXTURES), "cue": [config.cue_kind],
                     **({"class": class_names} if config.classes != "shape" else {})},
        "target_names": list(TARGET_NAMES),
        # units whose truth is a known SET of concepts: {target: {layer: {unit: [concepts]}}}
        "truth_sets": ({"cnn": {"poly": {str(j): list(p) for j, p in enumerate(gen.POLY_PAIRS)}}}
                       if config.polysemantic else {}),
        "counts": {"images": n_images, "masks": n_masks, **counts},
        "summary": summary,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # world.json is written last: its presence is what marks a finished world.
    (root / "world.json").write_text(json.dumps(meta, indent=2))


def _fit_poly(path: Path, config: WorldConfig, x_train: np.ndarray, scenes: dict, objmap: dict,
              x_test: np.ndarray, x_probe: np.ndarray, n_classes: int, epochs_factor: float = 4.0) -> dict:
    """Train the concept detectors of the CNN's `poly` layer (targets.ConceptPairs) on the
    training images with the CNN frozen, each cell's target the fraction of its pixels the
    concept covers (masks average-pooled to the 8x8 map), for four times the CNN's epochs (twice:
    the small objects' colours and the shapes stayed weak, per-image AUROC purple 0.82, circle
    0.71, and their top images showed other colours); set each detector's output scale on the
    probe images (ConceptPairs.calibrate: the quantiles of its per-image peak there, so on the
    images a dissect reads, a unit's top k are about half each detector's, whatever k); save them
    into the CNN's file. Returns each detector's test AUROC (its peak vs the concept's presence,
    per image) and the truth sets."""
    import torch
    import torch.nn.functional as F

    from . import targets as tg
    from .train import fit

    state = torch.load(path, map_location="cpu", weights_only=True)
    arch = dict(state["arch"], poly=[list(p) for p in gen.POLY_PAIRS])
    model = tg.make_target(arch, n_classes, config.size).eval()
    missing = model.load_state_dict(state["weights"], strict=False).missing_keys
    assert all(k.startswith("poly.") for k in missing), missing
    concepts = [c for pair in gen.POLY_PAIRS for c in pair]  # detector 2j, 2j+1 -> unit j

    @torch.no_grad()
    def prepare(x_uint8, sc, om, chunk=1000):
        """inputs [n, 3, S, S], CNN features [n, c4, S/8, S/8], targets [n, 2P, S/8, S/8]."""
        xs, fs, ts = [], [], []
        for i in range(0, len(x_uint8), chunk):
            x = tg.to_input(torch.from_numpy(x_uint8[i : i + chunk]))
            sub = {k: v[i : i + chunk] for k, v in sc.items()}
            m = torch.from_numpy(gen.concept_maps(sub, om[i : i + chunk], concepts)).float()
            xs.append(x)
            fs.append(model.features(x))
            ts.append(F.avg_pool2d(m, config.size // fs[-1].shape[-1]))
        return torch.cat(xs), torch.cat(fs), torch.cat(ts)

    x, f, t = prepare(x_train, scenes["train"], objmap["train"])
    poly = model.poly.train()
    fit(poly.parameters(), len(x),
        lambda idx: F.binary_cross_entropy_with_logits(poly.logits(x[idx], f[idx]), t[idx]),
        epochs=config.cnn_epochs * epochs_factor, lr=3e-3, seed=config.seed * 101 + 5, batch_size=128,
        weight_decay=0.0)
    poly.eval()

    with torch.no_grad():  # each detector's scale: its per-image peak over the probe images
        xp = tg.to_input(torch.from_numpy(x_probe))
        poly.calibrate(torch.cat([poly.logits(xp[i : i + 1000], model.features(xp[i : i + 1000]))
                                  for i in range(0, len(xp), 1000)]))

    @torch.no_grad()
    def peaks(x, f):  # [n, 2P]: each detector's max over the map
        return torch.cat([poly.detectors(x[i : i + 1000], f[i : i + 1000]).amax((2, 3))
                          for i in range(0, len(x), 1000)])

    x, f, t = prepare(x_test, scenes["test"], objmap["test"])
    peak, shown = peaks(x, f).numpy(), (t.amax((2, 3)) > 0.5).numpy()
    state["arch"], state["weights"] = arch, model.state_dict()
    torch.save(state, path)
    return {"layer": "poly", "version": POLY_VERSION, "truth_sets": [list(p) for p in gen.POLY_PAIRS],
            "detector_auroc": {c: round(_auroc(peak[:, j], shown[:, j]), 4) for j, c in enumerate(concepts)}}


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties at their mean rank); 0.5 without both classes."""
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if not n1 or not n0:
        return 0.5
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, ties averaged
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _write_images(root: Path, world_id: str, config: WorldConfig, scenes: dict, base: dict,
                  cued: dict, has_cue: dict, labels: dict, objmap: dict, template: np.ndarray,
                  progress: bool, poll) -> tuple[int, int]:
    """Every image as PNG plus images.parquet and masks.parquet; returns (images, masks).
    base[split] are the scenes without the cue, cued[split] with it where has_cue says (every
    test scene, once each way); poll() is called now and then (the workers' progress bars)."""
    S = config.size
    class_names = gen.class_names(config.classes)
    # Every image written to disk, in order: (split, image_id, scene index, has the cue).
    rows: list[tuple[str, str, int, bool]] = []
    for i in range(len(base["train"])):
        rows.append(("train", f"train/{i:05d}", i, bool(has_cue["train"][i])))
    for i in range(len(base["test"])):
        rows.append(("test", f"test/{i:05d}", i, False))
        rows.append(("test", f"test/{i:05d}-cue", i, True))
    for i in range(len(base["probe"])):
        rows.append(("probe", f"probe/{i:05d}", i, bool(has_cue["probe"][i])))
    for s in base:
        (root / "images" / s).mkdir(parents=True)
    img_cols: dict[str, list] = {c: [] for c in ("dataset", "image_id", "path", "width", "height",
                                                   "label", "caption", "split", "has_cue")}
    mask_cols: dict[str, list] = {c: [] for c in ("dataset", "image_id", "concept", "category",
                                                    "height", "width", "rle", "area")}
    with progress_bar(len(rows), "world: images and masks", enabled=progress) as bar:
        for n, (split, image_id, i, cue) in enumerate(rows, 1):
            rel = f"images/{image_id}.png"
            Image.fromarray((cued if cue else base)[split][i]).save(root / rel, compress_level=1)
            sc = scenes[split]
            img_cols["dataset"].append(world_id)
            img_cols["image_id"].append(image_id)
            img_cols["path"].append(rel)  # made absolute when read: the cache folder may move
            img_cols["width"].append(S)
            img_cols["height"].append(S)
            img_cols["label"].append(class_names[labels[split][i]])
            img_cols["caption"].append(gen.caption(sc, i, cue, config.cue_kind))
            img_cols["split"].append(split)
            img_cols["has_cue"].append(cue)
            for concept, cat, m in gen.concept_masks(sc, i, objmap[split][i], template if cue else None,
                                                     config.cue_kind, combined=config.classes != "shape"):
                mask_cols["dataset"].append(world_id)
                mask_cols["image_id"].append(image_id)
                mask_cols["concept"].append(concept)
                mask_cols["category"].append(cat)
                mask_cols["height"].append(S)
                mask_cols["width"].append(S)
                mask_cols["rle"].append(gen.rle_encode(m))
                mask_cols["area"].append(int(m.sum()))
            bar.update(1)
            if n % 200 == 0:
                poll()
    pq.write_table(pa.table(img_cols, schema=IMAGES_SCHEMA), root / "images.parquet")
    pq.write_table(pa.table(mask_cols, schema=MASKS_SCHEMA), root / "masks.parquet")
    return len(rows), len(mask_cols["rle"])


def _train_encoder(root: Path, world_id: str, config: WorldConfig, scenes: dict, base: dict,
                   x_train: np.ndarray, has_cue: dict, objmap: dict, template: np.ndarray,
                   rngs: dict, progress: bool, poll) -> dict:
    """Train the vision-language encoder on crops of the first training scenes, save it and
    measure its zero-shot accuracy on the test scenes; returns its summary."""
    import torch

    from . import encoder as enc
    from .train import n_steps

    t0, c0 = time.perf_counter(), time.process_time()
    S = config.size
    captions = enc.caption_set(config.cue_kind)
    # frozen [C, 384]; uncached, so the world's encoder is the same whatever this process encoded before
    text = torch.from_numpy(get_text_embedder().encode(captions, cached=False))
    m = min(config.encoder_images, len(x_train))
    cue_masks = np.zeros((m, S, S), bool)
    cue_masks[has_cue["train"][:m]] = template
    sc_enc = {k: v[:m] for k, v in scenes["train"].items()}
    crops, target = enc.make_crops(x_train[:m], objmap["train"][:m], sc_enc, cue_masks,
                                   config.cue_kind, rngs["encoder"], captions)
    batch_size = 128
    with progress_bar(n_steps(config.encoder_epochs, len(crops), batch_size), "world: train encoder",
                      enabled=progress) as bar:
        def step(k: int) -> None:
            bar.update(k)
            poll()
        tower = enc.train_tower(crops, target, text, epochs=config.encoder_epochs,
                                seed=config.seed * 101 + 7, batch_size=batch_size, on_step=step)
    enc.save_tower(tower, root / "encoder.pt")
    encoder = enc.ProbeEncoder(tower, f"probe:{world_id}")
    n_test = len(base["test"])
    zs = enc.zero_shot(encoder, base["test"], objmap["test"], scenes["test"],
                       np.zeros((n_test, S, S), bool), rngs["eval"])
    return {"id": encoder.id, "zero_shot": zs, "n_crops": int(len(crops)),
            "captions": len(captions), "train_s": round(time.perf_counter() - t0, 2),
            "train_cpu_s": round(time.process_time() - c0, 2)}


def _schemas():
    images = pa.schema([
        ("dataset", pa.string()), ("image_id", pa.string()), ("path", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("label", pa.string()),
        ("caption", pa.string()), ("split", pa.string()), ("has_cue", pa.bool_()),
    ])
    masks = pa.schema([
        ("dataset", pa.string()), ("image_id", pa.string()), ("concept", pa.string()),
        ("category", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
        ("rle", pa.list_(pa.int32())), ("area", pa.int32()),
    ])
    return images, masks


IMAGES_SCHEMA, MASKS_SCHEMA = _schemas()


def with_overrides(config: WorldConfig, **kw) -> WorldConfig:
    """config with the given fields replaced, skipping None (unset CLI options)."""
    return replace(config, **{k: v for k, v in kw.items() if v is not None})
