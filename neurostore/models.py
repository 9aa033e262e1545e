"""Target models by spec, and the one layer resolver.

Specs (`load_target(spec)`):

    torchvision:NAME[@WEIGHTS]   torchvision.models.get_model(NAME, weights=...). No @: the
                                 model's DEFAULT weights. @IMAGENET1K_V2 (or the full enum name
                                 ResNet50_Weights.IMAGENET1K_V2) picks weights; @random: no weights.
    timm:NAME[@random]           timm.create_model(NAME, pretrained=True); NAME may carry timm's
                                 own pretrained tag (vit_base_patch16_224.augreg_in21k).
    open_clip:MODEL/TAG          the visual tower of an OpenCLIP model (tag or local checkpoint,
                                 see neurostore.openclip); open_clip:MODEL/random for no weights.
    probe:cnn|vit|control[@DIR]  a target model of the probe world (neurostore.world): DIR is a
                                 world folder or id; without it the default world (built once).
    /path/model.pt               a local checkpoint: either a whole pickled nn.Module
                                 (torch.save(model, path)) or a dict {"factory": "pkg.mod:fn",
                                 "state_dict": ..., optional "kwargs": {...}, "classes": [...],
                                 "input_size": int}: the factory is called with kwargs and the
                                 state dict loaded into what it returns (strict).
    package.module:factory       imports the module and calls factory() -> nn.Module.

Only torchvision, timm and open_clip reach for weights over the network, and only when weights
are asked for; `@random` never does (tests use it), nor does `load_target(spec, weights=False)`
(the architecture alone: what `neurostore layers` needs). A download that fails is one line
naming the weights and the offline alternatives (`@random`, a local checkpoint). torchvision and
timm are imported by the spec that needs them (each adds seconds to a start that does not).

`default_layers(target)` picks the layers a researcher means: conv1, layer1-layer4, fc for
ResNets (CLIP-Dissect's choice); each block's MLP hidden neurons (and the head) for ViTs; the
stage outputs (and the head) for other CNNs.

Layers are named by their module path in `named_modules()`. `resolve_layer` passes full paths
through, expands `-1`-style indices into the list of hookable layers and answers an unknown name
with the close matches.
"""

from __future__ import annotations

import importlib
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .devices import resolve_device, resolve_precision
from .errors import BadInput, BadParameter, UnknownLayer, UnknownModel, did_you_mean, unknown
from .hooks import forward_hooks
from .openclip import create_openclip
from .weights import downloading, hub_url, seeded
from .world import load_world

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Target:
    """A model to dissect. `preprocess(PIL RGB) -> [3, S, S]`; `module` is in eval mode."""

    module: nn.Module
    id: str                                   # lowercase [a-z0-9_.-], the `model` key
    spec: str
    preprocess: Callable
    classes: list[str] | None = None
    input_size: int = 224
    # Token models (ViTs): tokens [prefix..., patch tokens in row-major grid order].
    num_prefix_tokens: int = 0
    grid_size: tuple[int, int] | None = None
    token_layout: str = "btc"                 # "btc" batch-first, "tbc" sequence-first
    # What part of the original image the input shows, to map activation maps back to pixels:
    # the central square covering `crop_fraction` of the shorter side (resize + center crop),
    # or None when the whole image is resized to the input (aspect not kept).
    crop_fraction: float | None = 1.0
    extra: dict = field(default_factory=dict)
    # Untrained weights (@random, /random, weights=False): its units explain nothing; the id says
    # so too (resnet50-random) and the pipeline puts the flag in the run and its summary.
    random_weights: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: "torch.dtype | None" = None       # autocast dtype for forward passes; None = fp32

    def to(self, device: "str | torch.device | None", precision: str | None = None) -> "Target":
        """Move the module to `device` (a --device spec or torch.device, checked by
        devices.resolve_device) and set the autocast `dtype` for `precision`; returns the target."""
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.module.to(self.device)
        return self

    @property
    def arch(self) -> str:
        return type(self.module).__name__

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def model_row(self) -> dict:
        """One row of schema/models.sql (minus run_id)."""
        return {"model": self.id, "spec": self.spec, "arch": self.arch, "n_params": self.n_params,
                "input_size": self.input_size, "classes": self.classes, "crop_fraction": self.crop_fraction}


def model_id(name: str) -> str:
    """Lowercase id with only [a-z0-9_.-]."""
    return re.sub(r"[^a-z0-9_.-]+", "-", name.lower()).strip("-") or "model"


def simple_preprocess(size: int, resize: int | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Resize the shorter side to `resize`, center-crop `size`, normalise."""
    from torchvision import transforms as T

    resize = resize or size
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])


# ---- loaders --------------------------------------------------------------------------------


def load_target(spec: str, *, input_size: int | None = None, id: str | None = None,
                weights: bool = True) -> Target:
    """Load a target model from its spec (see module doc). `input_size` overrides the side of the
    preprocessed input (convolutional nets and models that accept it); `id` overrides the id.
    weights=False builds torchvision/timm/OpenCLIP architectures without their weights (never
    touches the network; enough to list layers). The target is on the CPU: `.to(device)`."""
    spec = str(spec).strip()
    if input_size is not None and input_size < 1:  # 0 would read as 'the default' below
        raise BadParameter(f"--input-size {input_size}: give the input's side in pixels, e.g. 224.")
    kind, sep, rest = spec.partition(":")
    if kind == "torchvision" and sep:
        t = _torchvision(rest, spec, input_size, weights)
    elif kind == "timm" and sep:
        t = _timm(rest, spec, input_size, weights)
    elif kind == "open_clip" and sep:
        t = _open_clip(rest, spec, weights)
    elif kind == "probe" and sep:
        t = _probe(rest, spec)
    elif _looks_like_path(spec):
        t = _checkpoint(Path(spec).expanduser(), spec, input_size)
    elif sep and re.fullmatch(r"[A-Za-z_][\w.]*", kind) and re.fullmatch(r"[A-Za-z_]\w*", rest):
        t = _factory(kind, rest, spec, input_size)
    else:
        raise UnknownModel(
            f"Unknown model spec '{spec}'. Use torchvision:NAME[@WEIGHTS], timm:NAME, "
            "open_clip:MODEL/TAG, probe:cnn|vit|control, a local checkpoint path (.pt/.pth) or "
            "package.module:factory, e.g. torchvision:resnet50@IMAGENET1K_V2.")
    if id:
        t.id = model_id(id)
    t.module.eval()
    return t


def _looks_like_path(spec: str) -> bool:
    return spec.endswith((".pt", ".pth", ".bin", ".ckpt")) or spec.startswith(("/", "./", "~", "../")) \
        or Path(spec).exists()


def _torchvision(rest: str, spec: str, input_size: int | None, load_weights: bool = True) -> Target:
    import torchvision

    name, _, wname = rest.partition("@")
    valid = torchvision.models.list_models()
    if name not in valid:
        raise UnknownModel(unknown("torchvision model", name, valid,
                                   "Example: torchvision:resnet50@IMAGENET1K_V2."))
    weights = _torchvision_weights(name, wname or "DEFAULT")
    fetch = weights is not None and load_weights and not _in_torch_hub(weights.url)
    with downloading(f"torchvision:{name} ({weights})",
                     f"torchvision:{name}@random or a local checkpoint (torch.save(model, 'model.pt'))",
                     weights.url if fetch else None), seeded():
        module = torchvision.models.get_model(name, weights=weights if load_weights else None)
    classes = None
    if weights is not None:
        classes = list(weights.meta.get("categories") or []) or None
        tf = weights.transforms()
        crop = int(tf.crop_size[0])
        resize = int(tf.resize_size[0])
        size = input_size or crop
        preprocess = simple_preprocess(size, round(size * resize / crop), tuple(tf.mean), tuple(tf.std))
        crop_fraction = crop / resize
    else:
        size = input_size or 224
        preprocess = simple_preprocess(size, round(size * 256 / 224))
        crop_fraction = 224 / 256
    mid = model_id(name if weights is not None else f"{name}-random")
    t = Target(module, mid, spec, preprocess, classes, size, crop_fraction=crop_fraction,
               random_weights=weights is None or not load_weights)
    if hasattr(module, "encoder") and hasattr(module, "patch_size") and hasattr(module, "class_token"):
        # torchvision VisionTransformer: one class token, then patch tokens, batch first.
        g = size // module.patch_size
        t.num_prefix_tokens, t.grid_size = 1, (g, g)
    return t


def _torchvision_weights(name: str, wname: str):
    """The weights enum member for model `name`, or None for 'random'/'none'. No download."""
    import torchvision

    if wname.lower() in ("random", "none"):
        return None
    enum = torchvision.models.get_model_weights(name)
    member = wname.split(".")[-1]
    valid = [m for m in enum.__members__]
    if member not in valid:
        raise UnknownModel(unknown(f"weights for torchvision:{name}", wname, valid + ["random"],
                                   f"Example: torchvision:{name}@{valid[0] if valid else 'random'}."))
    return enum[member]


def _in_torch_hub(url: str) -> bool:
    """Whether torch.hub already holds the file of `url` (then loading it needs no network)."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(urllib.parse.urlsplit(url).path).name).is_file()


def _timm(rest: str, spec: str, input_size: int | None, load_weights: bool = True) -> Target:
    import timm

    name, _, flag = rest.partition("@")
    if flag and flag.lower() not in ("random", "none"):
        raise UnknownModel(f"Unknown timm weights '@{flag}' in '{spec}'. Put a pretrained tag in the "
                           "name (timm:vit_base_patch16_224.augreg_in21k) or use @random.")
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise UnknownModel(unknown("timm model", base, timm.list_models(),
                                   "Example: timm:vit_small_patch16_224."))
    pretrained = not flag
    with downloading(f"timm:{name}", f"timm:{name}@random or a local checkpoint (torch.save(model, 'model.pt'))",
                     hub_url() if pretrained and load_weights else None), seeded():
        try:
            # Transformers take img_size (the position embedding is resized); convnets do not.
            module = timm.create_model(name, pretrained=pretrained and load_weights,
                                       **({"img_size": input_size} if input_size else {}))
        except TypeError:
            module = timm.create_model(name, pretrained=pretrained and load_weights)
    cfg = timm.data.resolve_data_config({}, model=module)
    size = input_size or int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    preprocess = simple_preprocess(size, round(size / crop_pct), tuple(cfg["mean"]), tuple(cfg["std"]))
    classes = None
    if pretrained and load_weights and timm.data.infer_imagenet_subset(module) == "imagenet-1k":
        import torchvision  # its ImageNet-1k names, so a timm and a torchvision model share classes

        classes = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    t = Target(module, model_id(name if pretrained else f"{name}-random"), spec, preprocess, classes, size,
               crop_fraction=crop_pct, random_weights=not (pretrained and load_weights))
    _token_info_timm(module, t)
    return t


def _token_info_timm(module: nn.Module, t: Target) -> None:
    pe = getattr(module, "patch_embed", None)
    if pe is not None and hasattr(pe, "grid_size") and hasattr(module, "num_prefix_tokens"):
        t.num_prefix_tokens = int(module.num_prefix_tokens)
        t.grid_size = tuple(int(g) for g in pe.grid_size)


def _open_clip(rest: str, spec: str, load_weights: bool = True) -> Target:
    model, preprocess, info = create_openclip(rest, weights=load_weights)
    visual = model.visual
    size = info["image_size"]
    t = Target(visual, model_id(info["model_id"]), spec, preprocess, None, size, crop_fraction=1.0,
               random_weights=info["random_weights"])
    if getattr(visual, "class_embedding", None) is not None or hasattr(visual, "grid_size"):
        t.num_prefix_tokens = 1 if getattr(visual, "class_embedding", None) is not None else 0
        t.grid_size = tuple(int(g) for g in visual.grid_size)
        tr = getattr(visual, "transformer", None)
        t.token_layout = "btc" if getattr(tr, "batch_first", True) else "tbc"
    elif hasattr(visual, "trunk"):  # OpenCLIP's timm-backed towers
        _token_info_timm(visual.trunk, t)
    return t


def _probe(rest: str, spec: str) -> Target:
    name, _, world_dir = rest.partition("@")
    world = load_world(world_dir or None)
    names = list(getattr(world, "target_names", ["cnn", "vit", "control"]))
    if name not in names:
        raise UnknownModel(unknown("probe model", name, names, "Example: probe:cnn."))
    module = world.load_target(name)
    cfg = getattr(world, "config", None)
    size = int(getattr(world, "size", 0) or getattr(cfg, "size", 0) or 0) or _infer_size(world)
    t = Target(module, model_id(f"probe-{name}"), spec, world.preprocess, list(world.classes), size,
               crop_fraction=None, extra={"world": world})
    _token_info_timm(module, t)
    return t


def _infer_size(world) -> int:
    return int(world.preprocess(Image.new("RGB", (64, 64))).shape[-1])


def _checkpoint(path: Path, spec: str, input_size: int | None) -> Target:
    if not path.is_file():
        raise BadInput(f"Model checkpoint '{path}' does not exist. Give a .pt/.pth file holding a "
                       "pickled nn.Module or a dict with 'factory' and 'state_dict'.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise BadInput(f"Could not read model checkpoint '{path}': {e}. Save it with "
                       "torch.save(model, path) or torch.save({'factory': 'pkg.mod:fn', "
                       "'state_dict': model.state_dict()}, path).") from e
    meta = {}
    if isinstance(obj, nn.Module):
        module = obj
    elif isinstance(obj, dict) and "factory" in obj and "state_dict" in obj:
        module = _call_factory(obj["factory"], obj.get("kwargs") or {})
        try:
            module.load_state_dict(obj["state_dict"])
        except RuntimeError as e:
            raise BadInput(f"Checkpoint '{path}': state_dict does not fit {obj['factory']}: "
                           f"{str(e).splitlines()[0]}") from e
        meta = obj
    else:
        raise BadInput(f"Model checkpoint '{path}' holds a {type(obj).__name__}, not an nn.Module "
                       "or a dict with 'factory' and 'state_dict'. Save the model with "
                       "torch.save(model, path).")
    size = input_size or int(meta.get("input_size") or 224)
    t = Target(module, model_id(path.stem), spec, simple_preprocess(size), meta.get("classes"), size)
    _token_info_timm(module, t)
    return t


def _call_factory(ref: str, kwargs: dict) -> nn.Module:
    mod_name, _, fn_name = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise UnknownModel(f"Cannot import '{mod_name}' for model factory '{ref}': {e}. Is the "
                           "package installed and on PYTHONPATH?") from e
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))]
        raise UnknownModel(unknown(f"factory in {mod_name}", fn_name, names))
    module = fn(**kwargs)
    if not isinstance(module, nn.Module):
        raise UnknownModel(f"Factory '{ref}' returned {type(module).__name__}, not an nn.Module.")
    return module


def _factory(mod_name: str, fn_name: str, spec: str, input_size: int | None) -> Target:
    module = _call_factory(f"{mod_name}:{fn_name}", {})
    size = input_size or int(getattr(module, "input_size", 224))
    t = Target(module, model_id(fn_name), spec, simple_preprocess(size),
               getattr(module, "classes", None), size)
    _token_info_timm(module, t)
    return t


# ---- layers -----------------------------------------------------------------------------------


@dataclass
class LayerInfo:
    layer: str
    kind: str                 # conv, linear, vit_mlp, tokens, norm, logits, other
    shape: tuple[int, ...]    # output shape for one image, without the batch dimension
    n_units: int
    grid_h: int
    grid_w: int

    def as_dict(self) -> dict:
        return {"layer": self.layer, "kind": self.kind, "shape": list(self.shape),
                "n_units": self.n_units, "grid_h": self.grid_h, "grid_w": self.grid_w}


def _kind(module: nn.Module, name: str, out: torch.Tensor, is_last: bool) -> str:
    """is_last: the module's output is the model's output (the last call, or the tensor a
    wrapper such as torchvision's `heads` Sequential passes through)."""
    if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
        return "norm"
    if out.dim() == 4:
        return "conv" if isinstance(module, nn.Conv2d) else "other"
    if out.dim() == 3:
        # MLP neurons: the hidden layer and its activation inside a block's MLP.
        return "vit_mlp" if re.search(r"mlp\.", name) else "tokens"
    if out.dim() == 2:
        if isinstance(module, nn.Linear):
            return "logits" if is_last else "linear"
        return "other"
    return "other"


def token_grid(target: Target, n_tokens: int) -> tuple[int, int, int]:
    """(prefix, gh, gw) for a token sequence of length n_tokens."""
    if target.grid_size is not None:
        gh, gw = target.grid_size
        if n_tokens - gh * gw >= 0 and n_tokens - gh * gw == target.num_prefix_tokens:
            return target.num_prefix_tokens, gh, gw
    for prefix in (target.num_prefix_tokens, 0, 1):
        g = int(round((n_tokens - prefix) ** 0.5))
        if g > 0 and g * g == n_tokens - prefix:
            return prefix, g, g
    return 0, 1, n_tokens  # not a grid: one row of tokens


def _dummy_input(target: Target) -> torch.Tensor:
    return torch.zeros(1, 3, target.input_size, target.input_size, device=target.device)


def list_layers(target: Target) -> list[LayerInfo]:
    """Every module whose output is a 2-, 3- or 4-D tensor, in call order, with its output shape
    from one dummy forward pass. Modules called twice (a shared ReLU) are listed once, with the
    shape of their last call (what a hook records)."""
    cached = target.extra.get("_layers")
    if cached is not None:
        return cached
    shapes: dict[str, tuple] = {}
    order: list[str] = []
    outs: dict[str, torch.Tensor] = {}  # the last output of each module (one dummy image)
    modules = dict(target.module.named_modules())

    def make_hook(name):
        def hook(out):  # the whole output: a module returning a tuple is not a layer
            if isinstance(out, torch.Tensor) and 2 <= out.dim() <= 4:
                if name not in shapes:
                    order.append(name)
                outs[name] = out
                shapes[name] = tuple(out.shape[1:])  # [batch, ...] -> per-image shape
                if target.token_layout == "tbc" and out.dim() == 3:
                    shapes[name] = (out.shape[0], out.shape[2])
        return hook

    with torch.no_grad(), forward_hooks(target.module, {n: make_hook(n) for n in modules if n}, whole=True):
        try:
            final = target.module(_dummy_input(target))
        except RuntimeError as e:   # an input too small for the architecture's kernels or patches
            raise BadParameter(f"{target.spec} does not run on a {target.input_size}-pixel input "
                               f"({str(e).splitlines()[0][:160]}). Give a larger --input-size, e.g. 224.") from None
    infos = []
    for i, name in enumerate(order):
        shape = shapes[name]
        kind = _kind(modules[name], name, torch.empty((1, *shape)), i == len(order) - 1 or outs[name] is final)
        if len(shape) == 3:
            c, gh, gw = shape
        elif len(shape) == 2:
            _, gh, gw = token_grid(target, shape[0])
            c = shape[1]
        else:
            c, gh, gw = shape[0], 1, 1
        infos.append(LayerInfo(name, kind, shape, int(c), int(gh), int(gw)))
    target.extra["_layers"] = infos
    return infos


def layers_table_rows(target: Target, layers: list[str]) -> list[dict]:
    """Rows of schema/layers.sql (minus run_id) for the given layers; depth counts over all
    hookable layers of the model."""
    infos = list_layers(target)
    index = {li.layer: i for i, li in enumerate(infos)}
    n = max(len(infos) - 1, 1)
    rows = []
    for name in layers:
        li = infos[index[name]]
        rows.append({"layer": li.layer, "kind": li.kind, "n_units": li.n_units, "grid_h": li.grid_h,
                     "grid_w": li.grid_w, "depth": index[name], "depth_frac": index[name] / n,
                     "model": target.id})
    return rows


def resolve_layer(target: Target, name: str) -> str:
    """The module path for `name`: a full path passes through; an integer (e.g. -1) indexes the
    hookable layers of kind conv/linear/vit_mlp/logits; anything else fails with the close matches."""
    modules = dict(target.module.named_modules())
    if name in modules and name:
        return name
    if re.fullmatch(r"-?\d+", name.strip()):
        units = [li.layer for li in list_layers(target) if li.kind in ("conv", "linear", "vit_mlp", "logits")]
        i = int(name)
        if -len(units) <= i < len(units):
            return units[i]
        raise UnknownLayer(f"Layer index {i} is out of range for {target.id}: it has {len(units)} "
                           f"conv/linear/MLP/logit layers. See 'neurostore layers {target.spec}'.")
    valid = [n for n in modules if n]
    raise UnknownLayer(f"Unknown layer '{name}' for {target.id}.{did_you_mean(name, valid)} "
                       f"Layers are module paths ({len(valid)} in all); see "
                       f"'neurostore layers {target.spec}'.")


def layers(spec: str, input_size: int | None = None) -> list[dict]:
    """The `neurostore layers MODEL` command: hookable layers with kind, output shape, units, and
    whether the layer is a default one. Builds the architecture only: no weights, no network."""
    t = load_target(spec, input_size=input_size, weights=False)
    default = set(default_layers(t))
    return [{**li.as_dict(), "default": li.layer in default} for li in list_layers(t)]


# ---- default layers ---------------------------------------------------------------------------

RESNET_LAYERS = ("conv1", "layer1", "layer2", "layer3", "layer4")
UNIT_KINDS = ("conv", "vit_mlp", "linear", "logits")


def _is_mlp_hidden(modules: dict[str, nn.Module], layer: str) -> bool:
    """The first linear layer of a transformer block's MLP: its outputs are the MLP's hidden
    neurons (timm `mlp.fc1`, OpenCLIP `mlp.c_fc`, torchvision `mlp.0`, SAM `mlp.lin1`).

    We hook the linear output (pre-activation), not the GELU after it: GELU is increasing above
    its minimum at -0.75, so a neuron's top images and patches are the same either way; the
    linear layer exists under one rule in every family (torchvision's GELU is an anonymous `1`);
    and it is the convention of the keys (`blocks.N.mlp.fc1`) and of the probe ViT the demo's
    figures were measured on."""
    m = modules.get(layer)
    parent = modules.get(layer.rpartition(".")[0]) if "." in layer else None
    if not isinstance(m, nn.Linear) or parent is None or not layer.rpartition(".")[0].endswith("mlp"):
        return False
    return next((c for c in parent.children() if isinstance(c, nn.Linear)), None) is m


def _stage_outputs(target: Target, infos: list[LayerInfo]) -> list[str]:
    """The stage outputs of a CNN: in the container whose direct children span the most output
    resolutions (torchvision `features`, timm `stages`/`blocks`), the last child at each
    resolution (VGG: the ReLU before each pool; ConvNeXt, EfficientNet: each stage)."""
    modules = dict(target.module.named_modules())
    # A pool only shrinks the map before the next stage: the stage's output is what it pools.
    maps = [li for li in infos if len(li.shape) == 3
            and not isinstance(modules[li.layer], (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d))]
    groups: dict[str, list[LayerInfo]] = {}
    for li in maps:
        groups.setdefault(li.layer.rpartition(".")[0], []).append(li)
    best: list[LayerInfo] = []
    for parent, children in groups.items():
        res = {(li.grid_h, li.grid_w) for li in children}
        if len(res) > len({(li.grid_h, li.grid_w) for li in best}) or (
                len(res) == len({(li.grid_h, li.grid_w) for li in best}) and best
                and parent.count(".") < best[0].layer.rpartition(".")[0].count(".")):
            best = children
    if len({(li.grid_h, li.grid_w) for li in best}) < 3:
        return []
    last: dict[tuple, str] = {}
    for li in best:
        last[(li.grid_h, li.grid_w)] = li.layer
    return list(dict.fromkeys(last.values()))


def default_layers(target: Target, most: int = 6) -> list[str]:
    """The layers a researcher means (module doc), in depth order; always the classifier head
    when there is one (its units are the classes).

    ResNets: conv1, layer1-layer4, fc. Transformers: every block's MLP hidden layer (a ViT's
    conv patch stem is left out: its neurons are the MLP's). A small CNN (at most `most`
    conv/linear layers, like the probe CNN): every one. Other CNNs: the stage outputs. Anything
    else: `most` conv/linear layers spread over the depth."""
    infos = list_layers(target)
    names = [li.layer for li in infos]
    modules = dict(target.module.named_modules())
    head = [li.layer for li in infos if li.kind == "logits"][-1:]
    if all(n in names for n in RESNET_LAYERS):
        return [*RESNET_LAYERS, *(["fc"] if "fc" in names else head)]
    mlp = [li.layer for li in infos if li.kind == "vit_mlp" and _is_mlp_hidden(modules, li.layer)]
    if mlp:
        return mlp + [h for h in head if h not in mlp]
    units = [li.layer for li in infos if li.kind in UNIT_KINDS]
    if len(units) <= most:
        return units
    stages = _stage_outputs(target, infos)
    if stages:
        return stages + [h for h in head if h not in stages]
    pick = np.linspace(0, len(units) - 1, most).round().astype(int)
    return [units[i] for i in sorted(set(pick))]
