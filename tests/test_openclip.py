"""OpenCLIP adapter: a small random OpenCLIP model saved to disk and loaded back by path, through
OpenCLIP's own loading functions, exactly as a user would; and the errors a user gets."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from neurostore.encoders import load_encoder
from neurostore.errors import BadInput, UnknownEncoder
from neurostore.models import list_layers, load_target
from neurostore.openclip import save_openclip
from neurostore.record import activation_maps


TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY).eval()
    folder = save_openclip(model, TINY, tmp_path_factory.mktemp("oc") / "tiny-clip")
    return model, folder


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def test_load_folder_by_path(saved):
    model, folder = saved
    enc = load_encoder(f"open_clip:{folder}")
    assert enc.id == f"open_clip:{folder}" and enc.dim == 32 and enc.image_size == 32
    imgs = enc.embed_pil(_images())
    assert imgs.shape == (3, 32) and torch.allclose(imgs.norm(dim=1), torch.ones(3), atol=1e-5)
    txt = enc.encode_texts(["a red square", "a blue circle"])
    assert txt.shape == (2, 32) and torch.allclose(txt.norm(dim=1), torch.ones(2), atol=1e-5)
    # The weights on disk are the weights in use: same embeddings as the original model.
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(torch.stack([enc.preprocess(i) for i in _images()])), dim=-1)
    assert torch.allclose(imgs, ref, atol=1e-5)


@pytest.mark.parametrize("pool", ["argmax", "last"])
def test_texts_run_only_up_to_their_end_and_match_the_full_length(saved, pool):
    """A causal tower read at the end-of-text token runs each group of texts only up to its
    longest (10x fewer positions for single words): the library's own full-length embeddings, in
    the order given. A tower pooled elsewhere ('last', as a bidirectional one) runs at full length."""
    model, folder = saved
    enc = load_encoder(f"open_clip:{folder}")
    enc.model.text_pool_type = pool
    texts = ["a striped red sports car on a wet road", "dog", "a cat", "x", "two green birds in a tree", "sky"] * 30
    got = enc.encode_texts(texts)
    with torch.no_grad():
        want = torch.nn.functional.normalize(enc.model.encode_text(enc.tokenizer(texts)), dim=-1)
    assert torch.allclose(got, want, atol=1e-6)
    assert getattr(enc, "_prefix_ok", None) is (True if pool == "argmax" else None)


def test_load_weights_file_beside_config(saved):
    _, folder = saved
    enc = load_encoder(f"open_clip:{folder / 'open_clip_model.safetensors'}")
    assert enc.dim == 32


def test_model_name_and_checkpoint_file(saved, tmp_path):
    """open_clip:MODEL/PATH with a model registered through add_model_config, and a .pt that names
    its model."""
    model, _ = saved
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "neurostore-tiny.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    enc = load_encoder(f"open_clip:neurostore-tiny/{tmp_path / 'weights.pt'}")
    torch.save({"model_name": "neurostore-tiny", "state_dict": model.state_dict()}, tmp_path / "named.pt")
    enc2 = load_encoder(f"open_clip:{tmp_path / 'named.pt'}")
    x = enc.embed_pil(_images())
    assert torch.allclose(x, enc2.embed_pil(_images()), atol=1e-6)


def test_errors(tmp_path):
    with pytest.raises(UnknownEncoder, match=r"Unknown OpenCLIP model 'ViT-B-33'\. Did you mean ViT-B-32"):
        load_encoder("open_clip:ViT-B-33/laion2b_s34b_b79k")
    with pytest.raises(UnknownEncoder, match=r"Unknown pretrained tag for OpenCLIP ViT-B-32 'laion9'"):
        load_encoder("open_clip:ViT-B-32/laion9")
    with pytest.raises(UnknownEncoder, match="has no pretrained tag.*laion2b_s34b_b79k"):
        load_encoder("open_clip:ViT-B-32")
    with pytest.raises(BadInput, match=r"OpenCLIP checkpoint '.*missing\.pt' does not exist"):
        load_encoder(f"open_clip:{tmp_path / 'missing.pt'}")
    with pytest.raises(BadInput, match="does not exist"):
        load_encoder(f"open_clip:ViT-B-32/{tmp_path / 'missing.pt'}")
    (tmp_path / "plain").mkdir()
    with pytest.raises(BadInput, match="no open_clip_config.json"):
        load_encoder(f"open_clip:{tmp_path / 'plain'}")
    torch.save({"a": torch.zeros(1)}, tmp_path / "anon.pt")
    with pytest.raises(BadInput, match="does not say which model"):
        load_encoder(f"open_clip:{tmp_path / 'anon.pt'}")


def test_visual_tower_as_target(saved):
    _, folder = saved
    t = load_target(f"open_clip:{folder}")
    assert t.id == "tiny-clip" and t.num_prefix_tokens == 1 and t.grid_size == (4, 4)
    assert t.token_layout == "btc"  # open_clip 3.x runs its transformer batch-first
    infos = {li.layer: li for li in list_layers(t)}
    assert infos["transformer.resblocks.1.mlp.c_fc"].kind == "vit_mlp"
    x = torch.stack([t.preprocess(i) for i in _images()])
    captured = {}
    h = t.module.transformer.resblocks[1].mlp.c_fc.register_forward_hook(
        lambda m, i, o: captured.setdefault("out", o))
    maps = activation_maps(t, ["transformer.resblocks.1.mlp.c_fc"], x)["transformer.resblocks.1.mlp.c_fc"]
    h.remove()
    out = captured["out"]  # [batch, 1 + 16 tokens, 128]
    assert maps.shape == (3, 128, 4, 4)
    # Patch token (row 2, col 3) is token 1 + 2*4 + 3; the class token is dropped.
    assert torch.allclose(maps[:, :, 2, 3], out[:, 1 + 2 * 4 + 3, :])


def test_random_encoder_is_the_same_in_every_load(caplog):
    """open_clip:MODEL/random has one id, so it must have one set of weights: vectors cached
    under that id in another process stay right (seeded initialisation). Asked for by name, it
    builds without OpenCLIP's "initialized randomly" warning."""
    torch.manual_seed(1)
    a = load_encoder("open_clip:RN50/random")
    torch.manual_seed(2)
    b = load_encoder("open_clip:RN50/random")
    assert a.id == b.id and a.random_weights
    with caplog.at_level("WARNING"):
        assert torch.equal(a.encode_texts(["a dog", "a red car"]), b.encode_texts(["a dog", "a red car"]))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()], caplog.text


def test_registry_encoder_builds_its_weights_on_first_use():
    """A warm dissect encodes nothing, so it needs no encoder weights: a registry spec loads as a
    meta-device skeleton with OpenCLIP's preprocessing and the width, and the weights are built on
    the first encode, the same ones an eager build has."""
    from neurostore.encoding import SplitPreprocess
    from neurostore.openclip import create_openclip

    enc = load_encoder("open_clip:RN50/random")
    assert enc._model is None and enc.dim == 1024 and enc.image_size == 224
    eager, preprocess, _ = create_openclip("RN50/random")
    assert repr(enc.split_preprocess()) == repr(SplitPreprocess.of(preprocess)) and enc._model is None
    got = enc.encode_texts(["a dog", "a red car"])
    assert enc._model is not None and next(enc.model.parameters()).device.type == "cpu"
    with torch.no_grad():
        want = torch.nn.functional.normalize(eager.encode_text(open_clip.get_tokenizer("RN50")(["a dog", "a red car"])))
    assert torch.allclose(got, want, atol=1e-6)
    # a pretrained tag's skeleton has the tag's own preprocessing (SigLIP: mean 0.5, squash), no download
    _, pre, info = create_openclip("ViT-B-16-SigLIP/webli", skeleton=True)
    assert "mean=(0.5, 0.5, 0.5)" in repr(pre) and "CenterCrop" not in repr(pre) and not info["random_weights"]
    assert create_openclip("hf-hub:timm/ViT-B-16-SigLIP", skeleton=True) is None   # only a full load can tell


def test_split_preprocess_gives_the_same_pixels(saved):
    """Crops go to the encoder as uint8 and are normalised a batch at a time (patches): exactly the
    tensors of OpenCLIP's own preprocessing, any size or mode of image."""
    _, folder = saved
    enc = load_encoder(f"open_clip:{folder}")
    split = enc.split_preprocess()
    rng = np.random.default_rng(1)
    ims = _images() + [Image.fromarray(rng.integers(0, 255, (9, 300, 3), dtype=np.uint8)),
                       Image.fromarray(rng.integers(0, 255, (50, 50), dtype=np.uint8))]   # grey
    px = [split.pixels(im) for im in ims]
    assert all(p.dtype == np.uint8 and p.shape == (3, 32, 32) for p in px)
    assert torch.equal(split.batch(px), torch.stack([enc.preprocess(im) for im in ims]))


def test_patches_encoded_through_the_split_are_the_crops_embeddings(saved, tmp_path):
    from neurostore.images import ImageFolder
    from neurostore.patches import embed_patches, extract_patches
    from neurostore.record import record

    _, folder = saved
    enc = load_encoder(f"open_clip:{folder}")
    rng = np.random.default_rng(2)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    torch.manual_seed(0)
    t = load_target("torchvision:resnet18@random", input_size=48)
    src = ImageFolder(tmp_path)
    res = record(t, ["layer2"], src, k=2, batch_size=8, progress=False)
    ps = extract_patches(t, res, src, encoders=[enc], batch_size=5, workers=2, progress=False)
    ids, emb = ps.embeddings[enc.id]
    assert ids == ps.patch_ids and len(ids) > 5
    np.testing.assert_allclose(emb, embed_patches(ps.crops(src), enc, batch_size=7), atol=1e-5)


def test_a_real_model_is_explained_in_english_at_fp32_by_default(saved, tmp_path):
    """Without a vocabulary a real model gets CLIP-Dissect's kind (common English words), not the
    probe world's shapes and colours."""
    from neurostore.devices import cpu_bf16
    from neurostore.pipeline import dissect

    _, folder = saved
    (tmp_path / "img").mkdir()
    for i, im in enumerate(_images()):
        im.save(tmp_path / "img" / f"{i}.png")
    said = []
    s = dissect(tmp_path / "s", "torchvision:resnet18@random", images=tmp_path / "img", layers=["layer4"],
                encoder=f"open_clip:{folder}", scorers=["patch"], k=2, progress=False, log=said.append)
    assert s["vocabulary"] == "english" and s["concepts"] == 10_000
    # fp32 on a CPU by default; where the CPU has native bf16 the run says how to go faster
    assert s["precision"] == "fp32" and any("--precision bf16" in line for line in said) == cpu_bf16()


def test_texts_encoded_from_several_threads_at_once(saved):
    """The web server encodes search phrases in its request threads: the cut positions of one call
    never reach another's forward, and the tower is whole again afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    _, folder = saved
    enc = load_encoder(f"open_clip:{folder}")
    calls = [["x"] * 3, ["a striped red sports car on a wet road"] * 3, ["dog", "two green birds"]] * 20
    want = [enc.encode_texts(c) for c in calls]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(enc.encode_texts, calls))
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want))
    assert enc.model.positional_embedding.shape[0] == TINY["text_cfg"]["context_length"]
