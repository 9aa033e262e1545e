"""OpenCLIP models through OpenCLIP's own loading functions.

Specs (after `open_clip:`):

    MODEL/TAG          a registry model and pretrained tag: ViT-B-32/laion2b_s34b_b79k
                       (open_clip.create_model_and_transforms(MODEL, pretrained=TAG); downloads
                       the weights once, like any OpenCLIP user).
    MODEL/PATH         a registry model and a local checkpoint file (pretrained=PATH).
    MODEL/random       the architecture with random weights (tests, smoke runs).
    DIR                a local folder in OpenCLIP's hub layout: open_clip_config.json (model_cfg,
                       preprocess_cfg) and the weights (open_clip_model.safetensors, *.bin, *.pth)
                       — what `save_openclip(model, cfg, DIR)` writes and what `hf-hub:` fetches
                       (OpenCLIP's `local-dir:` schema).
    FILE               a weights file whose folder holds open_clip_config.json, or a torch file
                       holding {"model_name": MODEL, "state_dict": ...}.
    hf-hub:ORG/REPO    passed to OpenCLIP as is (online).

open_clip (and safetensors) are imported where used: importing open_clip takes seconds, and only
OpenCLIP specs need it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

import torch

from . import devices
from .encoding import Encoder, SplitPreprocess
from .errors import BadInput, UnknownEncoder, unknown
from .weights import downloading, hub_url, logging_quiet, seeded

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _is_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(WEIGHT_SUFFIXES) or Path(text).exists()


def create_openclip(rest: str, weights: bool = True, skeleton: bool = False):
    """(model in eval mode, preprocess, info) for a spec without the 'open_clip:' prefix.
    info: model_name, model_id (short, for ids), id (provenance), image_size, tokenizer_name,
    random_weights. weights=False: a registry model's architecture only (no download).
    skeleton=True: a registry model (/TAG or /random) on the meta device (no weights, no download,
    no initialisation: ~0.2 s) with the preprocessing its weights have; None for other specs."""
    import open_clip

    rest = rest.strip()
    if not rest:
        raise UnknownEncoder("Empty OpenCLIP spec. Use open_clip:MODEL/TAG, e.g. "
                             "open_clip:ViT-B-32/laion2b_s34b_b79k, or open_clip:/path/to/checkpoint.")
    if rest.startswith("hf-hub:"):
        model_name, pretrained, tok, short = rest, None, rest, rest.split("/")[-1]
        kwargs = {}
    elif rest.partition("/")[0] not in open_clip.list_models() and _is_path(rest):
        model_name, pretrained, kwargs, tok, short = _local(Path(rest).expanduser())
    else:
        name, _, tag = rest.partition("/")
        valid = open_clip.list_models()
        if name not in valid:
            raise UnknownEncoder(unknown("OpenCLIP model", name, valid,
                                        "Example: open_clip:ViT-B-32/laion2b_s34b_b79k."))
        tok, short, kwargs = name, name, {}
        if not tag and not weights:   # the architecture alone (`neurostore layers`): no tag needed
            tag = "random"
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise UnknownEncoder(f"OpenCLIP spec '{rest}' has no pretrained tag. Use "
                                 f"open_clip:{name}/TAG with TAG one of {', '.join(tags) or '(none)'}, "
                                 f"a checkpoint path, or open_clip:{name}/random.")
        if tag.lower() in ("random", "none"):
            pretrained, short = None, f"{name}-random"
        elif _is_path(tag):
            p = Path(tag).expanduser()
            if not p.is_file():
                raise BadInput(f"OpenCLIP checkpoint '{p}' does not exist. Give an existing weights "
                               "file, or a pretrained tag.")
            pretrained, short = str(p), f"{name}-{p.stem}"
        else:
            tags = open_clip.list_pretrained_tags_by_model(name)
            if tag not in tags:
                raise UnknownEncoder(unknown(f"pretrained tag for OpenCLIP {name}", tag,
                                            tags + ["random"], "Or give a local checkpoint path."))
            pretrained, short = tag, f"{name}-{tag}"
        model_name = name
    if skeleton:
        return _skeleton(rest, model_name, pretrained, kwargs, tok, short)
    if not weights and not model_name.startswith(("hf-hub:", "local-dir:")):
        pretrained = None
    # Only a pretrained tag or hf-hub: spec reaches for the network; local files fail as files.
    remote = model_name.startswith("hf-hub:") or (pretrained is not None and not _is_path(pretrained))
    fetch = (downloading(f"OpenCLIP {rest}", f"open_clip:{model_name.split('/')[0]}/random or a local "
                         "checkpoint (open_clip:MODEL/PATH)", _source(model_name, pretrained))
             if remote else contextlib.nullcontext())
    # /random is asked for by name and marked in the run: OpenCLIP's "No pretrained weights
    # loaded ... initialized randomly" warning would only look like something went wrong.
    quiet = logging_quiet() if pretrained is None and not model_name.startswith(("hf-hub:", "local-dir:")) \
        else contextlib.nullcontext()
    try:
        with fetch, seeded(), quiet:  # /random: the same weights in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
        raise UnknownEncoder(f"OpenCLIP could not load '{rest}': {e}") from e
    return model.eval(), preprocess, _info(rest, model, model_name, pretrained, tok, short)


def _info(rest: str, model, model_name: str, pretrained: str | None, tok: str, short: str) -> dict:
    size = model.visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return {"model_name": model_name, "model_id": short, "image_size": size, "tokenizer_name": tok,
            "id": f"open_clip:{rest}", "random_weights": pretrained is None and not model_name.startswith(
                ("hf-hub:", "local-dir:"))}


def _skeleton(rest: str, model_name: str, pretrained: str | None, kwargs: dict, tok: str, short: str):
    """create_openclip's result on the meta device, for a registry model and a tag or /random:
    the preprocessing is OpenCLIP's own, with the tag's settings (what loading the tag merges in)."""
    import open_clip

    if kwargs or model_name not in open_clip.list_models() or (pretrained is not None and _is_path(pretrained)):
        return None
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained else {}
    image = {f"image_{k}": tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag.get(k)}
    with torch.device("meta"), logging_quiet():
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="meta",
                                                                     **image)
    return model.eval(), preprocess, _info(rest, model, model_name, pretrained, tok, short)


def _source(model_name: str, tag: str | None) -> str:
    """Where OpenCLIP fetches these weights from: the hub, or a tag's own URL."""
    import open_clip

    cfg = {} if model_name.startswith("hf-hub:") else open_clip.get_pretrained_cfg(model_name, tag) or {}
    return cfg.get("url") if cfg.get("url") and not cfg.get("hf_hub") else hub_url()


def _local(path: Path):
    """Resolve a local file or folder to (model_name, pretrained, kwargs, tokenizer name, short id)."""
    if not path.exists():
        raise BadInput(f"OpenCLIP checkpoint '{path}' does not exist. Give a folder with "
                       "open_clip_config.json and weights, a weights file, or open_clip:MODEL/TAG.")
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise BadInput(f"OpenCLIP folder '{path}' has no open_clip_config.json. Save models with "
                           "neurostore.openclip.save_openclip or give open_clip:MODEL/PATH.")
        name = f"local-dir:{path.resolve()}"
        return name, None, {}, name, model_slug(path.name)
    sibling = path.parent / "open_clip_config.json"
    if sibling.is_file():
        others = [p for p in path.parent.iterdir() if p.suffix in WEIGHT_SUFFIXES and p != path]
        if not others:
            name = f"local-dir:{path.parent.resolve()}"
            return name, None, {}, name, model_slug(path.parent.name)
        # Several weight files: build from the config, then load this one explicitly.
        cfg = json.loads(sibling.read_text())["model_cfg"]
        cname = f"neurostore-local-{path.stem}"
        _register_config(cname, cfg)
        return cname, str(path), {}, cname, model_slug(path.stem)
    if path.suffix == ".safetensors":
        raise BadInput(f"OpenCLIP weights '{path}' have no open_clip_config.json beside them, so the "
                       "architecture is unknown. Use open_clip:MODEL/PATH with the model name.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"Could not read OpenCLIP checkpoint '{path}': {e}") from e
    if isinstance(obj, dict) and "model_name" in obj:
        import open_clip

        name = str(obj["model_name"])
        if name not in open_clip.list_models():
            raise UnknownEncoder(unknown("OpenCLIP model", name, open_clip.list_models(),
                                        f"(named in checkpoint '{path}')"))
        return name, str(path), {}, name, model_slug(path.stem)
    raise BadInput(f"OpenCLIP checkpoint '{path}' does not say which model it is. Use "
                   "open_clip:MODEL/PATH (e.g. open_clip:ViT-B-32/" + str(path) + ").")


def _register_config(name: str, model_cfg: dict) -> None:
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = model_cfg  # the registry add_model_config() fills from files


def model_slug(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-") or "open_clip"


def save_openclip(model, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None) -> Path:
    """Write `model` in OpenCLIP's hub layout (open_clip_config.json + open_clip_model.safetensors)
    so `open_clip:FOLDER` loads it back with OpenCLIP's own functions."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


class OpenClipEncoder(Encoder):
    """Image and text embeddings from an OpenCLIP model; rows of unit length.

    With `build`, `model` is a skeleton on the meta device (create_openclip(skeleton=True)) and
    the weights are built (or downloaded) on first use: a dissect whose texts, images and crops
    are all in the store never needs them (building ViT-B-32 took 1.6-3 s of a 12 s warm run)."""

    def __init__(self, model, preprocess, tokenizer, id: str, image_size: int, random_weights: bool = False,
                 build=None):
        self._model = None if build is not None else model.eval()
        self._build = build
        self._preprocess = preprocess
        self.tokenizer = tokenizer
        self.id = id
        self.image_size = image_size
        self.random_weights = random_weights
        with torch.no_grad():  # the width: from the meta skeleton's shapes, or one real text
            probe = model.encode_text(tokenizer(["a photo"]).to(next(model.parameters()).device))
        self.dim = int(probe.shape[-1])

    @classmethod
    def from_spec(cls, rest: str) -> "OpenClipEncoder":
        import open_clip

        skeleton = create_openclip(rest, skeleton=True)   # checks the spec; None: no skeleton for it
        model, preprocess, info = skeleton or create_openclip(rest)
        tokenizer = open_clip.get_tokenizer(info["tokenizer_name"])
        return cls(model, preprocess, tokenizer, info["id"], info["image_size"], info["random_weights"],
                   build=(lambda: create_openclip(rest)[0]) if skeleton else None)

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._build().eval().to(self.device)
        return self._model

    module = model

    def to(self, device: "str | torch.device | None" = "cpu", precision: str | None = None) -> "OpenClipEncoder":
        self.device = devices.resolve_device(device)
        self.dtype = devices.resolve_precision(precision, self.device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def preprocess(self, image):
        return self._preprocess(image)

    def split_preprocess(self):
        return SplitPreprocess.of(self._preprocess)

    def encode_images(self, batch: torch.Tensor) -> torch.Tensor:
        return self._run(self.model.encode_image, batch)  # [n, 3, S, S] -> [n, dim]

    TEXT_GROUP = 64   # texts of about one length encoded together

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, getattr(self, "dim", 0))
        tokens = self.tokenizer(list(texts))                                  # [n, ctx]
        with _TEXT_LOCK:   # the cut attributes are the model's own: one caller at a time (the web server's threads)
            return self._encode_tokens(tokens)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        ends = _pooled_positions(self.model, tokens)
        if ends is None or not self._prefix_is_exact(tokens):
            return self._run(self.model.encode_text, tokens)                  # [n, dim]
        # CLIP's text tower is causal and reads the end-of-text token: the positions after the
        # longest text of a group change nothing, so a group runs only up to it (a word is 3-6 of
        # the 77 positions: 10,000 words took 7.8 min on 2 CPU cores at full length)
        out = torch.empty(len(tokens), self.dim)
        order = torch.argsort(ends)
        for g in torch.split(order, self.TEXT_GROUP):
            n = int(ends[g].max()) + 1
            with _first_positions(self.model, n):
                out[g] = self._run(self.model.encode_text, tokens[g, :n])
        return out

    def _prefix_is_exact(self, tokens: torch.Tensor) -> bool:
        """Checked once per encoder on a few texts against the library's own full-length forward
        (an open_clip whose encode_text reads other attributes would differ): else full length."""
        if getattr(self, "_prefix_ok", None) is None:
            few = tokens[:4]
            n = int(_pooled_positions(self.model, few).max()) + 1
            full = self._run(self.model.encode_text, few)
            with _first_positions(self.model, n):
                short = self._run(self.model.encode_text, few[:, :n])
            self._prefix_ok = bool((full * short).sum(-1).min() > 0.999)
        return self._prefix_ok


_TEXT_LOCK = threading.Lock()


def _pooled_positions(model, tokens: torch.Tensor) -> "torch.Tensor | None":
    """[n] the position each text's embedding is read at, for a CLIP text tower with a causal mask
    that pools at the end-of-text token (open_clip's 'argmax' or 'eos'); None for any other
    (a bidirectional tower such as SigLIP's reads every position, padding too)."""
    import open_clip

    if not isinstance(model, open_clip.model.CLIP) or getattr(model, "attn_mask", None) is None:
        return None
    pool = getattr(model, "text_pool_type", "argmax")
    if pool == "argmax":
        return tokens.argmax(dim=-1)
    if pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return None


@contextlib.contextmanager
def _first_positions(model, n: int):
    """The text tower over its first `n` positions: its positional embedding and causal mask cut
    to them while the block runs (open_clip's encode_text adds the whole embedding)."""
    pos, mask = model.positional_embedding, model.attn_mask
    model.positional_embedding = torch.nn.Parameter(pos[:n], requires_grad=False)
    model.attn_mask = mask[:n, :n]
    try:
        yield
    finally:
        model.positional_embedding, model.attn_mask = pos, mask
