"""Neuron groups and their circuit on the fast probe world's dissected CNN and ViT (a copy of the
shared demo store), the attribution edges on a toy network whose answer is known, and the CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from neurostore.analysis._common import logits_of
from neurostore.grouping import TOP_EDGES, block_sums, groups, unit_edges
from neurostore.hooks import forward_hooks, keep
from neurostore.record import to_map
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


def _toy():
    """Layer b = block-diagonal 1x1 conv of layer a (one negative weight): a's units 0,1 feed only
    b's 0,1 and a's 2,3 only b's 2,3."""
    torch.manual_seed(0)
    a = nn.Conv2d(3, 4, 1)
    b = nn.Conv2d(4, 4, 1, bias=False)
    with torch.no_grad():
        b.weight.zero_()
        b.weight[:2, :2, 0, 0] = torch.tensor([[1.0, 2.0], [0.5, 1.0]])
        b.weight[2:, 2:, 0, 0] = torch.tensor([[3.0, 0.0], [-1.0, 1.0]])
    net = nn.Sequential(a, b).eval()
    return net, Target(net, "toy", "toy", None, None, 4)


def test_unit_edges_on_a_toy_network_follow_its_wiring():
    """A linear map's attribution is the exact contribution W[j, i] * mean act_i, with its sign;
    unconnected units get exactly 0."""
    net, t = _toy()
    x = torch.rand(5, 3, 4, 4)
    w = unit_edges(t, x, ["0", "1"])[("0", "1")]                           # [units_a, units_b]
    with torch.no_grad():
        act = net[0](x).mean((2, 3)).mean(0)                                 # [4]: mean over positions and images
    want = (net[1].weight.detach()[:, :, 0, 0] * act).T.numpy()             # [units_a, units_b]: W[j, i] * act_i
    assert w == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert (w[:2, 2:] == 0).all() and (w[2:, :2] == 0).all() and w[3, 2] == 0
    assert w[2, 3] != 0 and np.sign(w[2, 3]) == -np.sign(act[2].item())                       # the negative weight's sign


def test_group_edges_are_block_sums_of_unit_edges_on_the_toy_network():
    """The group edges of the toy wiring: group {0,1} of a feeds only group {0,1} of b, {2,3} only {2,3}."""
    net, t = _toy()
    x = torch.rand(5, 3, 4, 4)
    g = [np.array([0, 1]), np.array([2, 3])]
    w = block_sums(unit_edges(t, x, ["0", "1"])[("0", "1")], g, g)
    assert w[0, 1] == 0 and w[1, 0] == 0
    with torch.no_grad():
        act = net[0](x).mean((2, 3))                                          # [5, 4]: mean over positions
    want = lambda rows, cols: float((net[1].weight.detach()[rows][:, cols, 0, 0].sum(0) * act[:, cols]).sum(1).mean())  # noqa: E731
    assert w[0, 0] == pytest.approx(want([0, 1], [0, 1]), rel=1e-5)
    assert w[1, 1] == pytest.approx(want([2, 3], [2, 3]), rel=1e-5)


def _group_edges_one_backward_per_group(target, pixels, layers, members):
    """The former computation, kept as the reference: one backward per downstream group."""
    out = {}
    outs = {}
    with forward_hooks(target.module, {n: keep(outs, n) for n in layers}), torch.enable_grad():
        logits_of(target, pixels.clone().requires_grad_(True), exact=True)
        for up, down in zip(layers, layers[1:]):
            pooled = to_map(target, outs[down]).float().mean((2, 3))           # [b, units_down]
            w = np.zeros((len(members[up]), len(members[down])))
            for j, m in enumerate(members[down]):
                g, = torch.autograd.grad(pooled[:, m].sum(), outs[up], retain_graph=True)
                ga = to_map(target, (g * outs[up]).detach()).double().sum((2, 3))  # [b, units_up]
                for k, mu in enumerate(members[up]):
                    w[k, j] = float(ga[:, mu].sum()) / len(pixels)
            out[(up, down)] = w
    return out


def test_derived_group_edges_equal_one_backward_per_group():
    """On a small nonlinear CNN (ReLU, stride, 3x3): block sums of the unit edges = the former
    per-group backward, to float rounding."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.ReLU(),
                        nn.Conv2d(5, 4, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(7, 3, 12, 12)
    net(x)
    t = Target(net, "toy", "toy", None, None, 12)
    layers = ["1", "3", "4"]
    members = {"1": [np.array([0, 4]), np.array([1, 2, 3]), np.array([5])],
               "3": [np.array([0, 1, 2]), np.array([3, 4])], "4": [np.array([2]), np.array([0, 1, 3])]}
    w = unit_edges(t, x, layers)
    ref = _group_edges_one_backward_per_group(t, x, layers, members)
    for (up, down), r in ref.items():
        assert np.abs(r).max() > 0
        assert block_sums(w[(up, down)], members[up], members[down]) == pytest.approx(r, rel=1e-5, abs=1e-5 * np.abs(r).max())


def test_unit_edges_table_keeps_each_units_strongest_edges(grouped):
    """Per model: every unit of a layer has edges in and out of the adjacent layers, and its
    classes; at most TOP_EDGES per unit in each direction are its strongest (|weight|); the group
    edges are the block sums over the same units' full matrix (checked on the stored strongest)."""
    store, summaries = grouped
    for model, s in summaries.items():
        e = store.df("SELECT * FROM unit_edges WHERE model = $m", {"m": model})
        n = dict(zip(*store.df("SELECT layer, n_units FROM layers WHERE model = $m", {"m": model}).values.T))
        assert len(e) == s["unit_edges"] and set(e["n_images"][e["kind"] == "unit"]) == {s["edge_images"]}
        for up, down in zip(s["layers"], s["layers"][1:]):
            u = e[(e["kind"] == "unit") & (e["src_layer"] == up)]
            assert set(u["dst_layer"]) == {down}
            out_deg, in_deg = u.groupby("src_unit").size(), u.groupby("dst_unit").size()
            assert len(out_deg) == n[up] and len(in_deg) == n[down]              # every unit has edges both ways
            assert out_deg.min() >= min(TOP_EDGES, n[down]) and in_deg.min() >= min(TOP_EDGES, n[up])
            assert len(u) < n[up] * n[down]                                       # not the dense matrix
        c = e[e["kind"] == "class"]
        classes = store.df("SELECT classes FROM models WHERE model = $m", {"m": model})["classes"][0]
        per_unit = c.groupby(["src_layer", "src_unit"]).size()
        assert len(per_unit) == sum(n[l] for l in s["layers"]) and set(per_unit) == {min(TOP_EDGES, len(classes))}
        # A unit's class edges are its column of the audit attribution summed into its group's class edge.
        g = store.df("SELECT * FROM groups WHERE model = $m", {"m": model})
        ge = store.df("SELECT * FROM group_edges WHERE model = $m AND kind = 'class'", {"m": model})
        row = g.iloc[0]
        if len(classes) <= TOP_EDGES:
            mine = c[(c["src_layer"] == row["layer"]) & c["src_unit"].isin(list(row["units"]))]
            for cls, total in mine.groupby("class")["weight"].sum().items():
                stored = ge[(ge["src_layer"] == row["layer"]) & (ge["src_group"] == row["group_id"]) & (ge["class"] == cls)]
                assert float(stored["weight"].iloc[0]) == pytest.approx(total, rel=1e-4, abs=1e-6)


def test_cli_groups_query_and_errors(grouped, capsys, monkeypatch):
    store, _ = grouped
    code, out, err = run_cli(capsys, monkeypatch, "groups", "probe-cnn", "--groups", "3", "--layer", "conv3",
                             "--layer", "conv4", "--store", store.path, "--json")
    assert code == 0, err
    s = json.loads(out)
    n_classes = len(store.df("SELECT classes FROM models WHERE model = 'probe-cnn'")["classes"][0])
    assert s["groups"] == {"conv3": 3, "conv4": 3} and s["edges"] == 3 * 3 + 6 * n_classes
    assert s["unit_edges"] > 0 and s["edge_images"] == 64
    code, out, _ = run_cli(capsys, monkeypatch, "query", "class_circuit", "-p", "model=probe-cnn", "-p", "class=star",
                           "--store", store.path, "--format", "json")
    # conv3 and conv4 regrouped; conv1 and conv2 keep their groups (and the edge between them) from before
    assert code == 0 and {r["layer"] for r in json.loads(out)} == {"conv1", "conv2", "conv3", "conv4"}
    n = store.df("SELECT layer, count(*) AS n FROM groups WHERE model = 'probe-cnn' GROUP BY layer")
    assert dict(zip(n["layer"], n["n"])) == {"conv3": 3, "conv4": 3, **{l: g for l, g in
                                             grouped[1]["probe-cnn"]["groups"].items() if l in ("conv1", "conv2")}}
    kinds = store.df("SELECT src_layer, dst_layer FROM group_edges WHERE model = 'probe-cnn' AND kind = 'group'")
    assert set(zip(kinds["src_layer"], kinds["dst_layer"])) == {("conv1", "conv2"), ("conv3", "conv4")}
    for args, line in [
        (["probe-cnn", "--groups", "0"], "Error: --groups must be at least 1, got 0."),
        (["probe-cnn", "--edge-images", "0"], "Error: --edge-images must be at least 1, got 0."),
        (["probe-cnn", "--layer", "blocks.9"], "Error: Unknown layer 'blocks.9'. Valid: conv1, conv2, conv3, conv4. "
                                               "Groups are built on the dissected hidden layers of probe-cnn; dissect it "
                                               "first: 'neurostore dissect SPEC --layer blocks.9'."),
    ]:
        code, out, err = run_cli(capsys, monkeypatch, "groups", *args, "--store", store.path)
        assert code == 1 and out == "" and " ".join(err.split()) == line
    code, _, err = run_cli(capsys, monkeypatch, "groups", "probe-nope", "--store", store.path)
    assert code == 1 and err.startswith("Error: Unknown model 'probe-nope'.")
