"""Neuron groups and their circuit on the fast probe world's dissected CNN and ViT (a copy of the
shared demo store), the attribution edges on a toy network whose answer is known, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from neurostore.groups import group_edges, groups
from neurostore.models import Target
from neurostore.store import Store

from _cli import run_cli




@pytest.fixture(scope="module")
def grouped(demo_run, tmp_path_factory):
    """The demo store copied (groups write), grouped for the CNN and the ViT."""
    torch.set_num_threads(1)
    _, demo = demo_run
    path = tmp_path_factory.mktemp("groups") / "store"
    shutil.copytree(demo.path, path)
    store = Store.open(path)
    return store, {m: groups(store, m, log=lambda *a: None) for m in ("probe-cnn", "probe-vit")}


def test_groups_partition_each_layer_and_are_explained_by_their_members(grouped):
    store, summaries = grouped
    for model, s in summaries.items():
        layers = store.df("SELECT layer, n_units FROM layers WHERE model = $m AND kind <> 'logits'", {"m": model})
        assert sorted(s["layers"]) == sorted(layers["layer"])
        g = store.df("SELECT * FROM groups WHERE model = $m", {"m": model})
        expl = store.df("SELECT layer, unit, label FROM explanations WHERE model = $m AND scorer = 'patch'", {"m": model})
        for layer, n_units in zip(layers["layer"], layers["n_units"]):
            rows = g[g["layer"] == layer]
            members = np.concatenate(rows["units"].to_numpy())
            assert sorted(members.tolist()) == list(range(n_units))         # every unit in exactly one group
            assert len(rows) == s["groups"][layer] >= 2
            for _, r in rows.iterrows():
                labels = expl[(expl["layer"] == layer) & expl["unit"].isin(list(r["units"]))]["label"]
                assert list(r["concepts"]) and set(r["concepts"]) == set(labels)
                assert sum(r["concept_units"]) == r["n_units"] and r["label"] == r["concepts"][0]


def test_edges_connect_consecutive_layers_and_every_class(grouped):
    store, summaries = grouped
    for model, s in summaries.items():
        e = store.df("SELECT * FROM group_edges WHERE model = $m", {"m": model})
        classes = store.df("SELECT classes FROM models WHERE model = $m", {"m": model})["classes"][0]
        for up, down in zip(s["layers"], s["layers"][1:]):
            ge = e[(e["kind"] == "group") & (e["src_layer"] == up)]
            assert set(ge["dst_layer"]) == {down}
            assert len(ge) == s["groups"][up] * s["groups"][down]
        ce = e[e["kind"] == "class"]
        assert len(ce) == sum(s["groups"].values()) * len(classes) and set(ce["class"]) == set(classes)


def test_class_circuit_shows_the_spurious_cues_path_to_its_class(grouped, probe_world):
    """The cue class's top groups carry the cue concept in most layers; another class's do not."""
    store, summaries = grouped
    cue, cue_class = probe_world.config.cue_kind, probe_world.config.cue_class
    other = next(c for c in probe_world.classes if c != cue_class)

    def layers_with_cue(cls):
        rows = store.query("class_circuit", {"model": "probe-cnn", "class": cls, "top": 1}).to_pylist()
        assert [r["layer"] for r in rows] == summaries["probe-cnn"]["layers"]
        return sum(cue in r["concepts"][:2] for r in rows), len(rows)

    hits, n = layers_with_cue(cue_class)
    assert hits >= n / 2, (hits, n)
    assert layers_with_cue(other)[0] < hits


def test_group_edges_on_a_toy_network_follow_its_wiring():
    """Layer b = block-diagonal 1x1 conv of layer a: group {0,1} of a feeds only group {0,1} of b,
    {2,3} only {2,3}; a linear map's attribution is the exact contribution w * a."""
    a = nn.Conv2d(3, 4, 1)
    b = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        b.weight.zero_()
        b.weight[:2, :2, 0, 0] = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
        b.weight[2:, 2:, 0, 0] = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    net = nn.Sequential(a, b).eval()
    t = Target(net, "toy", "toy", None, None, 4)
    x = torch.rand(5, 3, 4, 4)
    members = {"0": [np.array([0, 1]), np.array([2, 3])], "1": [np.array([0, 1]), np.array([2, 3])]}
    w = group_edges(t, x, ["0", "1"], members)[("0", "1")]
    assert w[0, 1] == 0 and w[1, 0] == 0
    with torch.no_grad():
        act = a(x).mean((2, 3))                                              # [5, 4]: mean over positions
    want = lambda rows, cols: float((b.weight.detach()[rows][:, cols, 0, 0].sum(0) * act[:, cols]).sum(1).mean())  # noqa: E731
    assert w[0, 0] == pytest.approx(want([0, 1], [0, 1]), rel=1e-5)
    assert w[1, 1] == pytest.approx(want([2, 3], [2, 3]), rel=1e-5)


def test_cli_groups_query_and_errors(grouped, capsys, monkeypatch):
    store, _ = grouped
    code, out, err = run_cli(capsys, monkeypatch, "groups", "probe-cnn", "--groups", "3", "--layer", "conv3",
                             "--layer", "conv4", "--store", store.path, "--json")
    assert code == 0, err
    s = json.loads(out)
    n_classes = len(store.df("SELECT classes FROM models WHERE model = 'probe-cnn'")["classes"][0])
    assert s["groups"] == {"conv3": 3, "conv4": 3} and s["edges"] == 3 * 3 + 6 * n_classes
    code, out, _ = run_cli(capsys, monkeypatch, "query", "class_circuit", "-p", "model=probe-cnn", "-p", "class=star",
                           "--store", store.path, "--format", "json")
    assert code == 0 and {r["layer"] for r in json.loads(out)} == {"conv3", "conv4"}
    for args, line in [
        (["probe-cnn", "--groups", "0"], "Error: --groups must be at least 1, got 0."),
        (["probe-cnn", "--layer", "blocks.9"], "Error: Unknown layer 'blocks.9'. Valid: conv1, conv2, conv3, conv4. "
                                               "Groups are built on the dissected hidden layers of probe-cnn; dissect it "
                                               "first: 'neurostore dissect SPEC --layer blocks.9'."),
    ]:
        code, out, err = run_cli(capsys, monkeypatch, "groups", *args, "--store", store.path)
        assert code == 1 and out == "" and " ".join(err.split()) == line
    code, _, err = run_cli(capsys, monkeypatch, "groups", "probe-nope", "--store", store.path)
    assert code == 1 and err.startswith("Error: Unknown model 'probe-nope'.")
