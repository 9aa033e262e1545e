"""A real model audited on a folder of labelled photos: subfolder names as the model's classes
(names in any case, '_' for spaces, ImageNet synset ids and synonyms), and the class names of
a pretrained timm model, loaded offline from a Hugging Face cache as a user's machine has it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import open_clip
import torch
import torchvision
from PIL import Image

from neurostore.classnames import class_map, is_imagenet
from neurostore.images import ImageFolder
from neurostore.openclip import save_openclip

IMAGENET = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def test_folder_names_name_the_models_classes():
    got = class_map(["goldfish", "Great_White_Shark", "great-white-shark", "n01440764", "white shark",
                     "crane", "crane bird", "n02012849", "not a class", None], IMAGENET)
    assert got == {"goldfish": "goldfish", "Great_White_Shark": "great white shark",
                   "great-white-shark": "great white shark", "n01440764": "tench", "white shark": "great white shark",
                   "crane": "crane", "crane bird": "crane bird", "n02012849": "crane bird"}
    assert is_imagenet(IMAGENET) and not is_imagenet(IMAGENET[:999]) and not is_imagenet(["cat"] * 1000)
    # synset ids and synonyms are ImageNet's only: another model's classes match by name alone
    assert class_map(["n01440764", "Tench", "tinca tinca"], ["tench", "dog"]) == {"Tench": "tench"}


def _photos(root, layout):
    rng = np.random.default_rng(0)
    for rel, n in layout.items():
        (root / rel).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / rel / f"{i}.jpg")


def test_an_image_folder_labels_each_file_by_its_top_level_subfolder(tmp_path):
    _photos(tmp_path, {"cat": 1, "dog/close-ups": 1, ".": 1})
    src = ImageFolder(tmp_path)
    assert src.labels == {"cat/0.jpg": "cat", "dog/close-ups/0.jpg": "dog"}  # 0.jpg at the top: no label


def test_a_real_model_is_audited_on_a_folder_of_labelled_photos(tmp_path):
    """A classifier of three classes saved as a checkpoint, photos in class subfolders named the
    way folders name them: the audit reads all 12 labelled photos (and not the others) per class."""
    from neurostore.analysis import audit
    from neurostore.pipeline import dissect

    torch.manual_seed(0)
    classes = ["cat", "great white shark", "goldfish"]
    net = torchvision.models.resnet18(num_classes=3)
    torch.save({"factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 3},
                "state_dict": net.state_dict(), "classes": classes}, tmp_path / "pets.pt")
    tiny = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    clip = save_openclip(open_clip.model.CLIP(**tiny).eval(), tiny, tmp_path / "tiny-clip")
    _photos(tmp_path / "photos", {"Cat": 4, "great_white_shark": 4, "goldfish": 4, "holidays": 3, ".": 2})
    store = tmp_path / "s"
    dissect(store, str(tmp_path / "pets.pt"), images=tmp_path / "photos", layers=["layer4"],
            encoder=f"open_clip:{clip}", vocabulary="english-100", scorers=["patch"], k=3, progress=False)
    res = audit(store, top_units=3, verify_top=1, progress=False)
    assert res.models == ["pets"]
    rows = res.units.to_pylist()
    assert {r["class"] for r in rows} == set(classes)
    # the three classes' images, and only those, were the audit's probe set (4 per class)
    import neurostore as ns
    from neurostore.analysis._common import load_model, probe_images

    st = ns.open(store, read_only=True)
    probe = probe_images(st, "pets", load_model(st, "pets", "cpu", "fp32"))
    assert sorted(probe.image_ids) == sorted(f"{d}/{i}.jpg" for d in ("Cat", "great_white_shark", "goldfish")
                                             for i in range(4))
    assert np.bincount(probe.labels, minlength=3).tolist() == [4, 4, 4]


def test_a_pretrained_timm_model_has_imagenet_class_names(tmp_path):
    """timm weights from the Hugging Face cache (offline, as a user's machine holds them after a
    first download): the model's classes are ImageNet-1k's, named as torchvision names them."""
    script = textwrap.dedent("""
        import os, sys, timm
        from safetensors.torch import save_file
        snap = os.path.join(sys.argv[1], "hub", "models--timm--resnet18.a1_in1k")
        os.makedirs(os.path.join(snap, "refs"))
        os.makedirs(os.path.join(snap, "snapshots", "0" * 40))
        open(os.path.join(snap, "refs", "main"), "w").write("0" * 40)
        save_file(timm.create_model("resnet18").state_dict(),
                  os.path.join(snap, "snapshots", "0" * 40, "model.safetensors"))
        from neurostore.models import load_target
        for spec in ("timm:resnet18.a1_in1k", "timm:resnet18@random"):
            t = load_target(spec)
            print(spec, t.random_weights, len(t.classes or []), (t.classes or [None])[0])
    """)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["timm:resnet18.a1_in1k False 1000 tench", "timm:resnet18@random True 0 None"]
