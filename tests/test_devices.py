"""--device and --precision: one resolver (neurostore.devices) behind every command that runs a
model. These machines have no GPU: CUDA is checked by asking for it and getting the one-line
refusal; the CPU paths (fp32, bf16 autocast) run for real."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from neurostore.devices import autocast, available_devices, resolve_device, resolve_precision
from neurostore.errors import BadParameter

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    assert "cpu" in available_devices()


@NO_CUDA
def test_missing_cuda_names_the_devices_there_are():
    with pytest.raises(BadParameter) as e:
        resolve_device("cuda")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("Device 'cuda' is not available on this machine; it has: cpu")
    with pytest.raises(BadParameter, match="Unknown device 'tpu'"):
        resolve_device("tpu")


def test_precision_on_the_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(BadParameter, match="fp16 is not supported on the CPU"):
        resolve_precision("fp16", cpu)
    lin = torch.nn.Linear(4, 3)
    with autocast(cpu, torch.bfloat16):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16  # autocast really applies


def test_target_to_device_and_precision():
    from neurostore.analysis._common import all_logits
    from neurostore.models import load_target

    t = load_target("torchvision:resnet18@random", input_size=32).to("cpu", "bf16")
    assert (t.device, t.dtype) == (torch.device("cpu"), torch.bfloat16)
    x = torch.randn(4, 3, 32, 32)
    low = all_logits(t, x)
    assert low.dtype.name == "float32" and low.shape == (4, 1000)
    t.to("cpu", "fp32")
    exact = all_logits(t, x)
    assert abs(low - exact).max() < 0.1 * abs(exact).max()  # bf16: same logits to ~3 digits


def test_encoders_run_on_their_device_and_return_fp32_cpu_unit_rows(probe_world):
    from neurostore.encoders import load_encoder

    enc = load_encoder(f"probe:{probe_world.root}", device="cpu", precision="bf16")
    assert (enc.device, enc.dtype, enc.random_weights) == (torch.device("cpu"), torch.bfloat16, False)
    x = torch.stack([probe_world.encoder().preprocess(probe_world.render_scene("test", i)) for i in range(4)])
    low = enc.encode_images(x)
    assert low.dtype == torch.float32 and low.device.type == "cpu"
    assert torch.allclose(low.norm(dim=1), torch.ones(4), atol=1e-5)
    exact = load_encoder(f"probe:{probe_world.root}", device="cpu").encode_images(x)
    assert (low * exact).sum(1).min() > 0.99
    with pytest.raises(BadParameter, match="fp16 is not supported on the CPU"):
        load_encoder(f"probe:{probe_world.root}", device="cpu", precision="fp16")


def test_openclip_random_encoder_is_marked_random():
    from neurostore.encoders import load_encoder

    enc = load_encoder("open_clip:ViT-B-32/random", device="cpu")
    assert enc.random_weights and enc.device == torch.device("cpu")
    v = enc.encode_texts(["a striped cat"])
    assert v.dtype == torch.float32 and v.shape == (1, enc.dim)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "neurostore.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@NO_CUDA
@pytest.mark.parametrize("command", [
    ["ablate", "probe-cnn", "--units", "conv4:0"],
    ["audit", "--model", "probe-cnn"],
    ["find", "striped", "--method", "open"],
])
def test_cli_device_cuda_without_cuda_is_one_error_line(tmp_path, command):
    p = _cli(*command, "--device", "cuda", "--store", tmp_path / "no-store")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [
        "Error: Device 'cuda' is not available on this machine; it has: cpu. Use --device auto (or one of those)."]


def test_cli_device_cpu_runs_the_model(demo_run, tmp_path):
    _, store = demo_run
    mine = tmp_path / "store"
    shutil.copytree(store.path, mine)  # ablate writes: never into the shared session store
    p = _cli("ablate", "probe-cnn", "--units", "conv4:0,1", "--device", "cpu", "--precision", "bf16",
             "--max-images", "200", "--store", mine, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    assert out["ablations"][0]["neurons"] == ["conv4/0", "conv4/1"]
    from neurostore.store import Store

    params = Store.open(mine).sql("SELECT params FROM runs WHERE run_id = $r", {"r": out["run_id"]}).to_pylist()
    assert '"device": "cpu"' in params[0]["params"] and '"precision": "bf16"' in params[0]["params"]
