"""The probe world: a generated image world whose every pixel is labelled, small target models
trained on it (a CNN and a ViT that lean on a spurious cue, a control CNN that does not), and a
vision-language encoder aligned to the frozen MiniLM text space. Offline ground truth for
explanations, audits and comparisons.

    from neurostore.world import WorldConfig, build_world
    world = build_world(WorldConfig(seed=0, cue_kind="dot", cue_class="ring"))
    world.images(), world.masks(), world.load_target("vit"), world.encoder(), world.summary

The models (targets, encoder) and torch are imported where a World loads them: opening a world and
reading its tables never imports torch.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from ..errors import BadInput, BadParameter, unknown
from . import generate
from .build import TARGET_NAMES, WorldConfig, build, default_cache, world_dir

__all__ = [
    "World", "WorldConfig", "build_world", "load_world", "load_probe_encoder", "list_worlds",
    "default_cache", "world_dir",
]


class World:
    """A built probe world in its cache folder (read-only view)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        meta_path = self.root / "world.json"
        if not meta_path.exists():
            raise BadInput(f"'{root}' is not a built probe world (no world.json). Build one with "
                           "'neurostore world build' or pass a folder it printed.")
        self.meta = json.loads(meta_path.read_text())
        self.id: str = self.meta["id"]
        self.config = WorldConfig.from_dict(self.meta["config"])
        self.classes: list[str] = list(self.meta["classes"])
        self.concepts: dict[str, list[str]] = {k: list(v) for k, v in self.meta["concepts"].items()}
        self.target_names: list[str] = list(self.meta["target_names"])
        self.summary: dict = self.meta["summary"]
        # {target: {layer: {unit: [concepts]}}}: units whose truth is a known set (polysemantic)
        self.truth_sets: dict = self.meta.get("truth_sets", {})
        self.size: int = self.config.size

    def __repr__(self) -> str:
        c = self.config
        return (f"World({self.id}, cue={c.cue_kind}->{c.cue_class}@{c.cue_strength}, "
                f"seed={c.seed}, root={self.root})")

    # ---- tables -------------------------------------------------------------------------------

    def images(self):
        """Arrow table in the shape of schema/images.sql (minus run_id and content_hash, which the
        dissect adds as it reads the files); absolute paths."""
        t = pq.read_table(self.root / "images.parquet")
        absolute = pc.binary_join_element_wise(pa.scalar(str(self.root)), t["path"], "/")
        return t.set_column(t.schema.get_field_index("path"), "path", absolute)

    def masks(self):
        """Arrow table in the shape of schema/masks.sql (minus run_id)."""
        return pq.read_table(self.root / "masks.parquet")

    def mask(self, image_id: str, concept: str) -> np.ndarray:
        """One decoded mask -> bool [H, W] (all False when the concept is absent)."""
        t = self.masks()
        t = t.filter(pc.and_(pc.equal(t["image_id"], image_id), pc.equal(t["concept"], concept)))
        if t.num_rows == 0:
            return np.zeros((self.size, self.size), bool)
        r = t.slice(0, 1).to_pylist()[0]
        return generate.rle_decode(r["rle"], r["height"], r["width"])

    # ---- scenes -------------------------------------------------------------------------------

    @functools.cached_property
    def _scenes(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "scenes.npz") as z:
            return {k: z[k] for k in z.files}

    def scenes(self, split: str) -> dict[str, np.ndarray]:
        """Scene records of a split (see generate.sample_scenes), plus 'has_cue' where stored."""
        self._check_split(split)
        pre = f"{split}."
        return {k[len(pre):]: v for k, v in self._scenes.items() if k.startswith(pre)}

    def render(self, split: str, indices, cue: bool | None = None):
        """Re-render scenes -> (uint8 [n,S,S,3], objmap int8 [n,S,S]). cue=None draws the cue
        where the stored image has it; True/False force it on or off (paired scenes)."""
        sc = self.scenes(split)
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        n = len(sc["n_obj"])
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise BadParameter(f"Scene index out of range for split '{split}': valid 0..{n - 1}.")
        sub = {k: v[idx] for k, v in sc.items()}
        pixels, objmap = generate.render(sub, self.size)
        if cue is None:
            flags = sub.get("has_cue", np.zeros(len(idx), bool))
        else:
            flags = np.full(len(idx), bool(cue))
        tpl = generate.cue_template(self.config.cue_kind, self.size)
        return generate.apply_cue(pixels, flags, tpl), objmap

    def render_scene(self, split: str, index: int, cue: bool | None = None):
        """One scene as a PIL image, with or without the cue (None: as stored)."""
        return Image.fromarray(self.render(split, [index], cue)[0][0])

    def cue_pairs(self, split: str = "test"):
        """Other-class scenes without and with the cue -> (clean [n,3,S,S], cued [n,3,S,S],
        labels [n]) as target inputs; what a cue audit feeds the models."""
        import torch

        from .targets import to_input

        labels = generate.class_labels(self.scenes(split), self.config.classes)
        idx = np.flatnonzero(labels != self.classes.index(self.config.cue_label))
        clean, _ = self.render(split, idx, cue=False)
        cued, _ = self.render(split, idx, cue=True)
        return (to_input(torch.from_numpy(clean)), to_input(torch.from_numpy(cued)),
                torch.from_numpy(labels[idx].astype(np.int64)))

    def _check_split(self, split: str) -> None:
        if split not in ("train", "test", "probe"):
            raise BadParameter(unknown("split", split, ["train", "test", "probe"]))

    # ---- models -------------------------------------------------------------------------------

    def preprocess(self, image):
        """PIL image -> [3, S, S] input of every target model of this world."""
        from .targets import preprocess

        return preprocess(image, self.size)

    def load_target(self, name: str):
        """Target model by name ('cnn', 'vit', 'control'), in eval mode."""
        import torch

        from .targets import make_target

        if name not in self.target_names:
            raise BadParameter(unknown("probe target", name, self.target_names,
                                       "Use probe:cnn, probe:vit or probe:control."))
        state = torch.load(self.root / "targets" / f"{name}.pt", map_location="cpu",
                           weights_only=True)
        model = make_target(state["arch"], len(self.classes), self.size)
        model.load_state_dict(state["weights"])
        return model.eval()

    def encoder(self):
        """The world's vision-language encoder (Encoder interface; text = frozen MiniLM)."""
        from .encoder import ProbeEncoder

        return ProbeEncoder.load(self.root / "encoder.pt", f"probe:{self.id}")


def build_world(config: WorldConfig | None = None, cache: str | Path | None = None, *,
                progress: bool = True, force: bool = False, device: str = "cpu") -> World:
    """Build (or load from the cache) the probe world of `config` (see neurostore.world.build:
    `device` is where its target models train, the CPU by default for bit-identical weights)."""
    return World(build(config, cache, progress=progress, force=force, device=device))


def load_world(path_or_id: str | Path | None = None, cache: str | Path | None = None,
               search: Sequence[str | Path] = (), *, build: bool = True) -> World:
    """A built world by folder, by id ('probe-1a2b3c4d') in the cache or among the `search`
    folders (e.g. the worlds a store was dissected on), or the default world (built if absent,
    unless build=False)."""
    if path_or_id is None:
        if not build and not (world_dir(WorldConfig(), cache) / "world.json").exists():
            raise BadInput("The default probe world is not built yet. Build it with "
                           "'neurostore world build' (or name a world; 'neurostore world ls').")
        return build_world(WorldConfig(), cache)
    p = Path(path_or_id)
    if (p / "world.json").exists():
        return World(p)
    worlds = [World(Path(d)) for d in search if (Path(d) / "world.json").exists()] + list_worlds(cache)
    for w in worlds:
        if w.id == str(path_or_id):
            return w
    raise BadInput(unknown("probe world", str(path_or_id), [w.id for w in worlds],
                           "Pass a world folder or id; 'neurostore world ls' lists them."))


def list_worlds(cache: str | Path | None = None) -> list[World]:
    """Every finished world in the cache (unfinished builds are skipped)."""
    root = (Path(cache) if cache is not None else default_cache()) / "worlds"
    if not root.exists():
        return []
    return [World(d) for d in sorted(root.iterdir()) if (d / "world.json").exists()]


def load_probe_encoder(world: str | Path | None = None, search: Sequence[str | Path] = ()):
    """Encoder of a world folder (or id), or of the default world, built if absent."""
    return load_world(world, search=search).encoder()


def worlds_in_store(store) -> list[str]:
    """World folders a store's probe models were loaded from (specs 'probe:NAME@FOLDER')."""
    specs = store.sql("SELECT DISTINCT spec FROM models WHERE spec LIKE 'probe:%@%'").column("spec").to_pylist()
    return sorted({s.split("@", 1)[1] for s in specs})


__all__ += ["TARGET_NAMES"]
