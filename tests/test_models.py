"""Target models by spec, layer listing and the layer resolver. Nothing downloads: @random."""

import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

from neurostore.errors import BadInput, BadParameter, UnknownLayer, UnknownModel
from neurostore.models import (_torchvision_weights, default_layers, layers, layers_table_rows, list_layers,
                               load_target, resolve_layer)



@pytest.fixture(scope="module")
def resnet():
    return load_target("torchvision:resnet18@random", input_size=64)


def test_torchvision_random(resnet):
    t = resnet
    assert t.id == "resnet18-random" and t.spec == "torchvision:resnet18@random"
    assert not t.module.training and t.classes is None and t.input_size == 64
    x = t.preprocess(Image.new("RGB", (100, 80), (200, 10, 10)))
    assert x.shape == (3, 64, 64)
    assert t.model_row()["arch"] == "ResNet" and t.model_row()["n_params"] > 1_000_000


def test_list_layers_resnet(resnet):
    infos = {li.layer: li for li in list_layers(resnet)}
    assert infos["layer4.1.conv2"].kind == "conv" and infos["layer4.1.conv2"].shape == (512, 2, 2)
    assert infos["layer1.0.bn1"].kind == "norm"
    assert infos["fc"].kind == "logits" and infos["fc"].n_units == 1000
    assert infos["layer3"].n_units == 256 and (infos["layer3"].grid_h, infos["layer3"].grid_w) == (4, 4)
    rows = layers_table_rows(resnet, ["conv1", "fc"])
    assert rows[0]["depth"] == 0 and rows[1]["depth_frac"] == 1.0 and rows[1]["model"] == "resnet18-random"


def test_resolve_layer(resnet):
    assert resolve_layer(resnet, "layer4.1.conv2") == "layer4.1.conv2"
    assert resolve_layer(resnet, "-1") == "fc"
    assert resolve_layer(resnet, "0") == "conv1"
    with pytest.raises(UnknownLayer) as e:
        resolve_layer(resnet, "layer9")
    msg = str(e.value)
    assert msg.startswith("Unknown layer 'layer9' for resnet18-random. Did you mean layer4, layer3, layer2?")
    assert "neurostore layers torchvision:resnet18@random" in msg
    with pytest.raises(UnknownLayer, match="out of range"):
        resolve_layer(resnet, "-999")


def test_unknown_models():
    with pytest.raises(UnknownModel, match=r"Unknown torchvision model 'resnet5'\. Did you mean"):
        load_target("torchvision:resnet5")
    with pytest.raises(UnknownModel, match=r"Unknown weights for torchvision:resnet18 'IMAGENET9'"):
        load_target("torchvision:resnet18@IMAGENET9")
    with pytest.raises(UnknownModel, match="Unknown timm model 'vit_tiny_patch16_22'"):
        load_target("timm:vit_tiny_patch16_22@random")
    with pytest.raises(UnknownModel, match="Unknown model spec 'bogus'"):
        load_target("bogus")


def test_torchvision_weights_enum_and_classes_without_download():
    w = _torchvision_weights("resnet50", "IMAGENET1K_V2")
    assert w.meta["categories"][0] == "tench" and len(w.meta["categories"]) == 1000
    assert _torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert _torchvision_weights("resnet50", "random") is None


def test_timm_vit_tokens_become_a_grid():
    t = load_target("timm:vit_tiny_patch16_224@random", input_size=64)
    assert t.num_prefix_tokens == 1 and t.grid_size == (4, 4)
    infos = {li.layer: li for li in list_layers(t)}
    fc1 = infos["blocks.0.mlp.fc1"]
    assert fc1.kind == "vit_mlp" and fc1.shape == (17, 768) and (fc1.grid_h, fc1.grid_w) == (4, 4)


def test_checkpoint_whole_module_and_factory_dict(tmp_path, monkeypatch):
    pkg = tmp_path / "mymodels.py"
    pkg.write_text(textwrap.dedent("""
        from torch import nn
        def tiny(width=4):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import mymodels

    m = mymodels.tiny(width=5)
    torch.save(m, tmp_path / "whole.pt")
    t = load_target(str(tmp_path / "whole.pt"), input_size=32)
    assert t.id == "whole" and [li.layer for li in list_layers(t)] == ["0", "1", "2", "3", "4"]
    torch.save({"factory": "mymodels:tiny", "kwargs": {"width": 5}, "state_dict": m.state_dict(),
                "classes": ["a", "b"], "input_size": 32}, tmp_path / "dict.pth")
    t2 = load_target(str(tmp_path / "dict.pth"))
    assert t2.classes == ["a", "b"] and t2.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(t2.module(x), m.eval()(x))
    t3 = load_target("mymodels:tiny", input_size=32)
    assert t3.id == "tiny" and list_layers(t3)[0].shape == (4, 32, 32)
    with pytest.raises(BadInput, match="does not exist"):
        load_target(str(tmp_path / "missing.pt"))
    torch.save({"weights": 1}, tmp_path / "bad.pt")
    with pytest.raises(BadInput, match="not an nn.Module"):
        load_target(str(tmp_path / "bad.pt"))
    with pytest.raises(UnknownModel, match="Unknown factory in mymodels 'tinny'. Did you mean tiny"):
        load_target("mymodels:tinny")


def test_probe_world_targets(probe_world):
    """probe:NAME@DIR dispatches to the world (the session's fast world from conftest)."""
    cnn = load_target(f"probe:cnn@{probe_world.root}")
    assert cnn.id == "probe-cnn" and cnn.classes == list(probe_world.classes)
    assert cnn.input_size == probe_world.size and cnn.crop_fraction is None
    assert list_layers(cnn)
    vit = load_target(f"probe:vit@{probe_world.root}")
    assert vit.num_prefix_tokens >= 1 and vit.grid_size is not None
    fc1 = {li.layer: li for li in list_layers(vit)}["blocks.0.mlp.fc1"]
    assert fc1.kind == "vit_mlp" and (fc1.grid_h, fc1.grid_w) == tuple(vit.grid_size)
    with pytest.raises(UnknownModel, match="Unknown probe model 'cnnn'. Did you mean cnn"):
        load_target(f"probe:cnnn@{probe_world.root}")


def test_cli_layers_json_and_error():
    from typer.testing import CliRunner

    from neurostore.cli import app

    r = CliRunner().invoke(app, ["layers", "torchvision:resnet18@random", "--input-size", "32", "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.stdout)
    assert out["layers"][0] == {"layer": "conv1", "kind": "conv", "shape": [64, 16, 16], "n_units": 64,
                                "grid_h": 16, "grid_w": 16, "default": True}
    assert [r["layer"] for r in out["layers"] if r["default"]] == ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    p = subprocess.run([sys.executable, "-m", "neurostore.cli", "layers", "torchvision:resnet1"],
                       capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.startswith("Error: Unknown torchvision model 'resnet1'. Did you mean resnet18")
    for size, says in (("0", "--input-size 0: give the input's side"), ("-5", "--input-size -5: give"),
                       ("8", "does not run on a 8-pixel input (")):   # were a traceback, or 224 for 0
        r = CliRunner().invoke(app, ["layers", "timm:vit_tiny_patch16_224@random", f"--input-size={size}"])
        assert isinstance(r.exception, BadParameter) and says in str(r.exception), r.exception  # a one-line error


# ---- default layers, one test per family (random weights, small inputs) ---------------------------


def test_default_layers_resnets_are_clip_dissects(resnet):
    """torchvision and timm ResNets: conv1, layer1-layer4, fc (not layer3.0.downsample.0)."""
    want = ["conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert default_layers(resnet) == want
    assert default_layers(load_target("timm:resnet18@random", input_size=64)) == want


def test_default_layers_torchvision_vit_are_mlp_hidden_neurons():
    t = load_target("torchvision:vit_b_16@random")
    assert default_layers(t) == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(12)] + ["heads.head"]
    infos = {li.layer: li for li in list_layers(t)}
    assert infos["encoder.layers.encoder_layer_0.mlp.0"].n_units == 3072
    assert infos["heads.head"].kind == "logits"  # the output, though `heads` (a Sequential) returns it


def test_default_layers_timm_vit():
    t = load_target("timm:vit_tiny_patch16_224@random", input_size=64)
    assert default_layers(t) == [f"blocks.{i}.mlp.fc1" for i in range(12)] + ["head"]


def test_default_layers_openclip_visual_tower():
    t = load_target("open_clip:ViT-B-32/random")
    assert t.random_weights and t.id == "vit-b-32-random"
    assert default_layers(t) == [f"transformer.resblocks.{i}.mlp.c_fc" for i in range(12)]
    # `neurostore layers` builds the architecture only, so it needs no pretrained tag
    from neurostore.models import layers
    assert [r["layer"] for r in layers("open_clip:ViT-B-32") if r["default"]] == default_layers(t)


@pytest.mark.parametrize("spec, want", [
    ("torchvision:convnext_tiny@random", ["features.1", "features.3", "features.5", "features.7", "classifier.2"]),
    ("torchvision:vgg11@random", ["features.1", "features.4", "features.9", "features.14", "features.19", "classifier.6"]),
    ("timm:convnext_atto@random", ["stages.0", "stages.1", "stages.2", "stages.3", "head.fc"]),
])
def test_default_layers_other_cnns_are_stage_outputs(spec, want):
    assert default_layers(load_target(spec, input_size=64)) == want


def test_default_layers_probe_models_unchanged(probe_world):
    """The demo's figures were measured on these: every conv and the head; every MLP fc1 and the head."""
    cnn = load_target(f"probe:cnn@{probe_world.root}")
    assert default_layers(cnn) == ["conv1", "conv2", "conv3", "conv4", "fc"]
    vit = load_target(f"probe:vit@{probe_world.root}")
    depth = len(vit.module.blocks)
    assert default_layers(vit) == [f"blocks.{i}.mlp.fc1" for i in range(depth)] + ["head"]
    assert not cnn.random_weights and not vit.random_weights


# ---- weights: listing needs none, a failed download is one line -------------------------------------


def test_random_weights_marked(resnet):
    assert resnet.random_weights and resnet.id == "resnet18-random"


def test_target_to_device(resnet):
    assert resnet.device == torch.device("cpu")
    assert resnet.to("cpu") is resnet and next(resnet.module.parameters()).device.type == "cpu"


_OFFLINE = textwrap.dedent("""
    import os, sys
    # No network: any connection goes to a closed local port (and the HF hub is told it is offline).
    os.environ.update(https_proxy="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9",
                      HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HF_HUB_OFFLINE="1",
                      TORCH_HOME=sys.argv[1], HF_HOME=sys.argv[1])
    sys.argv = ["neurostore", *sys.argv[2:]]
    from neurostore.cli import main
    main()
""")


def _offline_cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-c", _OFFLINE, str(tmp_path), *args], capture_output=True, text=True,
                          timeout=300)


def test_layers_of_pretrained_spec_needs_no_weights(tmp_path):
    """`neurostore layers torchvision:resnet50` used to download the weights just to list layers."""
    p = _offline_cli(tmp_path, "layers", "torchvision:resnet18", "--input-size", "32", "--json")
    assert p.returncode == 0, p.stderr
    import json

    assert json.loads(p.stdout)["layers"][0]["layer"] == "conv1"
    assert not list(tmp_path.rglob("*.pth"))  # nothing was downloaded
    rows = layers("timm:resnet18", input_size=32)  # timm: pretrained=False when listing
    assert [r["layer"] for r in rows if r["default"]][0] == "conv1"


def test_failed_download_is_one_line(tmp_path):
    p = _offline_cli(tmp_path, "dissect", "torchvision:resnet18", "--store", str(tmp_path / "s"))
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr and p.stderr.strip().endswith(lines[0]), p.stderr
    assert lines[0].startswith("Error: Could not download the weights of torchvision:resnet18 (ResNet18_Weights.")
    assert "torchvision:resnet18@random" in lines[0] and "local checkpoint" in lines[0]


def test_failed_encoder_download_wrapped_by_open_clip_is_one_line(tmp_path):
    """open_clip re-raises the hub's OSError as a RuntimeError: still one line naming the weights
    and the offline alternative (the default encoder of a dissect on a folder needs a download)."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "img" / "a.jpg")
    p = _offline_cli(tmp_path, "dissect", "torchvision:resnet18@random", "--images", str(tmp_path / "img"),
                     "--layer", "layer4", "--store", str(tmp_path / "s"))
    assert p.returncode == 1
    lines = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr and p.stderr.strip().endswith(lines[0]), p.stderr
    assert lines[0].startswith("Error: Could not download the weights of OpenCLIP ViT-B-32/"), lines[0]
    assert "open_clip:ViT-B-32/random" in lines[0]


_UNREACHABLE = textwrap.dedent("""
    import os, sys
    # The hub at a closed local port and no proxy, no HF_HUB_OFFLINE: an offline machine as a user has it.
    for k in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(k, None)
    os.environ.update(HF_ENDPOINT="http://127.0.0.1:9", TORCH_HOME=sys.argv[1], HF_HOME=sys.argv[1])
    sys.argv = ["neurostore", *sys.argv[2:]]
    from neurostore.cli import main
    main()
""")


def test_unreachable_hub_fails_at_once(tmp_path):
    """Without the check, huggingface_hub retried the closed port five times (~50 s of 'Retrying in
    8s' warnings) before the error; now one line names the host, and nothing is retried."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "img" / "a.jpg")
    p = subprocess.run([sys.executable, "-c", _UNREACHABLE, str(tmp_path), "dissect", "torchvision:resnet18@random",
                        "--images", str(tmp_path / "img"), "--layer", "layer4", "--store", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert "Retrying" not in p.stderr and "ERROR:" not in p.stderr, p.stderr
    lines = [l for l in p.stderr.splitlines() if l.startswith("Error:")]
    assert len(lines) == 1 and p.stderr.strip().endswith(lines[0]), p.stderr
    assert "127.0.0.1 cannot be reached" in lines[0] and "not in the local cache" in lines[0], lines[0]
    assert "open_clip:ViT-B-32/random" in lines[0]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("spec", ["torchvision:resnet18@random", "timm:vit_tiny_patch16_224@random",
                                  "open_clip:RN50/random"])
def test_random_weights_are_the_same_in_every_load(spec):
    """Random initialisation is seeded: cached embeddings and checkpoints keyed by the spec stay
    valid across processes. The caller's RNG is left as it was."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = load_target(spec).module
    torch.rand(5)  # a different RNG state must not change the next load
    b = load_target(spec).module
    assert _same_weights(a, b)
    torch.manual_seed(123)
    load_target(spec)
    assert torch.equal(torch.rand(3), before)


def test_logging_quiet_restores_what_was_disabled_before():
    """Nested (a failed download inside a skeleton build): the inner one gives back the outer's level."""
    import logging

    from neurostore.weights import logging_quiet

    with logging_quiet(logging.WARNING):
        with logging_quiet(logging.ERROR):
            assert logging.root.manager.disable == logging.ERROR
        assert logging.root.manager.disable == logging.WARNING
    assert logging.root.manager.disable == logging.NOTSET
