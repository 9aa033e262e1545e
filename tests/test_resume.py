"""Resumable dissect: a run SIGKILLed after a checkpoint, then the same call, ends with exactly
the tables of an uninterrupted run; nothing partial is visible in between; a checkpoint of other
work (or a damaged one) is never used."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neurostore.pipeline import dissect
from neurostore.store import Store

ARGS = dict(layers=["conv2", "fc"], scorers=["patch", "cos_cubed", "iou"], max_images=120, batch_size=8,
            checkpoint_every=0.0, progress=False, evaluate=False)


def _tables(store: Store) -> dict:
    out = {}
    for t in store.tables():
        if t == "runs":
            continue
        cols = [c for c, *_ in store.schema(t) if c != "run_id"]
        out[t] = store.sql(f'SELECT {", ".join(chr(34) + c + chr(34) for c in cols)} FROM "{t}" ORDER BY ALL').to_pylist()
    return out


def _killed_after_a_checkpoint(spec: str, store_dir: Path, world_root: Path, args: dict = ARGS,
                               suffix: str = ".pt") -> Path:
    """Start the dissect in a subprocess and SIGKILL it as soon as its first checkpoint exists
    (`suffix` ".json": the first index of its spilled encoder_iou windows)."""
    code = ("import sys, json; from neurostore.pipeline import dissect; from neurostore.world import load_world; "
            f"dissect({str(store_dir)!r}, {spec!r}, world=load_world({str(world_root)!r}), "
            f"log=lambda *a: None, **json.loads(sys.argv[1]))")
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stderr=subprocess.PIPE)
    ck = store_dir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if ck.exists() and any(f.suffix == suffix for f in ck.iterdir()):
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait()
    assert p.returncode == -signal.SIGKILL, p.stderr.read().decode()[-2000:]
    return next(f for f in ck.iterdir() if f.suffix == suffix)


@pytest.fixture(scope="module")
def uninterrupted(probe_world, tmp_path_factory):
    store = Store.open(tmp_path_factory.mktemp("whole") / "s")
    s = dissect(store, f"probe:cnn@{probe_world.root}", world=probe_world, log=lambda *a: None, **ARGS)
    assert s["resumed_from"] == 0 and s["checkpoints"] > 0
    assert not list((store.path / "checkpoints").glob("*.pt"))   # removed at commit
    return _tables(store)


def test_killed_dissect_resumes_to_the_tables_of_an_uninterrupted_run(probe_world, tmp_path, uninterrupted):
    spec = f"probe:cnn@{probe_world.root}"
    ckpt = _killed_after_a_checkpoint(spec, tmp_path / "s", probe_world.root)
    store = Store.open(tmp_path / "s")
    assert "activations" not in store.tables() or not store.table_counts().get("activations")  # nothing partial
    (ckpt.parent / f".{ckpt.name}.999.abcdef.tmp").write_bytes(b"half")  # as a write killed midway leaves
    s = dissect(store, spec, world=probe_world, log=lambda *a: None, **ARGS)
    assert 0 < s["resumed_from"] < 120
    assert not list(ckpt.parent.iterdir())  # the checkpoint and the killed write's temporary file
    assert _tables(store) == uninterrupted


def test_a_checkpoint_of_other_work_or_a_damaged_one_is_not_used(probe_world, tmp_path, uninterrupted):
    spec = f"probe:cnn@{probe_world.root}"
    ckpt = _killed_after_a_checkpoint(spec, tmp_path / "s", probe_world.root)
    store = Store.open(tmp_path / "s")
    other = dissect(store, spec, world=probe_world, log=lambda *a: None, **{**ARGS, "layers": ["conv2"]})
    assert other["resumed_from"] == 0 and ckpt.exists()        # other layers: other work
    ckpt.write_bytes(ckpt.read_bytes()[:100])                  # damaged: the run starts over
    s = dissect(store, spec, world=probe_world, log=lambda *a: None, **ARGS)
    assert s["resumed_from"] == 0 and not ckpt.exists()
    mine = _tables(store)
    for t in ("activations", "units", "pooled"):
        assert [r for r in mine[t] if r["layer"] == "fc"] == [r for r in uninterrupted[t] if r["layer"] == "fc"]
    # scores: some crop vectors came from the conv2 run's batches (float rounding differs at 1e-8)
    a, b = ([r for r in rows["scores"] if r["layer"] == "fc"] for rows in (mine, uninterrupted))
    assert [r["concept"] for r in a] == [r["concept"] for r in b]
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-5


def test_killed_in_the_window_pass_resumes_without_encoding_its_spilled_windows(probe_world, tmp_path):
    """encoder_iou's windows (28 per image, the costly part of its pass) are spilled beside the
    checkpoint: a run killed once their index names some images, then the same call, encodes
    only the others and ends with exactly the tables of an uninterrupted run; the spill goes at
    commit."""
    spec, args = f"probe:cnn@{probe_world.root}", {**ARGS, "layers": ["conv2"], "scorers": ["patch", "encoder_iou"]}
    whole = Store.open(tmp_path / "whole")
    total = dissect(whole, spec, world=probe_world, log=lambda *a: None, **args)["passes"]["encoded_cells"]
    assert total == 120 * 28
    index = _killed_after_a_checkpoint(spec, tmp_path / "s", probe_world.root, args, suffix=".json")
    spilled = len(json.loads(index.read_text())["hashes"])
    assert spilled > 0
    store = Store.open(tmp_path / "s")
    # `check` shows what the killed run left (not the store's data: the store stays clean)
    left = store.check()
    assert left["clean"] and index.name in {Path(c["path"]).name for c in left["checkpoints"]}
    assert all(c["bytes"] > 0 for c in left["checkpoints"])
    s = dissect(store, spec, world=probe_world, log=lambda *a: None, **args)
    assert s["passes"]["encoded_cells"] == total - 28 * spilled
    assert not list((tmp_path / "s" / "checkpoints").iterdir()) and store.check()["checkpoints"] == []
    assert _tables(store) == _tables(whole)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, MemoryError])
def test_ctrl_c_in_the_window_pass_keeps_the_windows_encoded_so_far(probe_world, tmp_path, monkeypatch, stop):
    """Ctrl-C (or an error, such as running out of memory) between checkpoints: the windows
    encoded so far are indexed on the way out (here no checkpoint is due), so the same call
    encodes only the rest."""
    from neurostore.pipeline import _CellCache

    spec = f"probe:cnn@{probe_world.root}"
    args = {**ARGS, "layers": ["conv2"], "scorers": ["patch", "encoder_iou"], "checkpoint_every": 1e9}
    add, calls = _CellCache.add, []

    def interrupted(self, hashes, emb):
        calls.append(len(hashes))
        if len(calls) == 3:
            raise stop
        add(self, hashes, emb)

    monkeypatch.setattr(_CellCache, "add", interrupted)
    store = Store.open(tmp_path / "s")
    with pytest.raises(stop):
        dissect(store, spec, world=probe_world, log=lambda *a: None, **args)
    monkeypatch.setattr(_CellCache, "add", add)
    index = next((tmp_path / "s" / "checkpoints").glob("*.windows.json"))
    assert len(json.loads(index.read_text())["hashes"]) == sum(calls[:2]) > 0
    s = dissect(store, spec, world=probe_world, log=lambda *a: None, **args)
    assert s["passes"]["encoded_cells"] == 28 * (120 - sum(calls[:2]))


def _stopped_then_resumed(probe_world, tmp_path, monkeypatch, stage: str, stopping, stop=KeyboardInterrupt,
                          args: dict = ARGS, said: list | None = None) -> tuple[dict, Store]:
    """A dissect whose pipeline function `stage` is replaced by `stopping(real)` raises `stop`; then
    the same call with the real one. Returns the second call's summary and the store."""
    import neurostore.pipeline as P

    spec, real = f"probe:cnn@{probe_world.root}", getattr(P, stage)
    monkeypatch.setattr(P, stage, stopping(real))
    store = Store.open(tmp_path / "s")
    with pytest.raises(stop):
        dissect(store, spec, world=probe_world, log=(said if said is not None else []).append, **args)
    monkeypatch.setattr(P, stage, real)
    return dissect(store, spec, world=probe_world, log=lambda *a: None, **args), store


def _raises(e):
    def stopping(real):
        def stopped(*a, **k):
            raise e
        return stopped
    return stopping


def test_ctrl_c_after_the_image_pass_keeps_the_pass(probe_world, tmp_path, monkeypatch, uninterrupted):
    """Ctrl-C while the patches are cut (here before any checkpoint was due): the ended image pass
    is saved on the way out, so the same call decodes no image for it again and ends with the
    tables of an uninterrupted run."""
    said, checkpoints = [], []

    def stopping(real):
        def stopped(*a, **k):
            checkpoints.extend((tmp_path / "s" / "checkpoints").glob("*.pt"))
            raise KeyboardInterrupt
        return stopped

    s, store = _stopped_then_resumed(probe_world, tmp_path, monkeypatch, "extract_patches", stopping,
                                     args={**ARGS, "checkpoint_every": 1e9}, said=said)
    assert any("saving the image pass" in m for m in said) and checkpoints == []   # none due before the stop
    # the image pass is not run again: its 120 images are decoded once, by the IoU pass (iou), and
    # their whole-image vectors come from the checkpoint
    assert s["resumed_from"] == 120 and s["passes"]["decoded"] == 120 and s["passes"]["encoded_images"] == 0
    assert not list((tmp_path / "s" / "checkpoints").iterdir())
    assert _tables(store) == uninterrupted


@pytest.mark.parametrize("sig, stop", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_ctrl_c_or_sigterm_in_the_image_pass_keeps_it_to_the_batch(probe_world, tmp_path, monkeypatch, uninterrupted,
                                                                   sig, stop):
    """Ctrl-C (or SIGTERM, a scheduler's time limit) in the image pass, no checkpoint due: the batch
    in hand is finished and the pass saved at its end, so the same call goes on from there and
    ends with the tables of an uninterrupted run. A second signal stops at once."""
    from neurostore.record import Recorder

    spec, args = f"probe:cnn@{probe_world.root}", {**ARGS, "checkpoint_every": 1e9}
    update, calls = Recorder.update, []

    def signalled(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:             # in the third batch of 8
            os.kill(os.getpid(), sig)   # delivered here, between two bytecodes of this batch
        return update(self, *a, **k)

    monkeypatch.setattr(Recorder, "update", signalled)
    store, said = Store.open(tmp_path / "s"), []
    with pytest.raises(stop):
        dissect(store, spec, world=probe_world, log=said.append, **args)
    assert any("saving the image pass at image 24 of 120" in m for m in said), said
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handlers are given back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(Recorder, "update", update)
    s = dissect(store, spec, world=probe_world, log=lambda *a: None, **args)
    assert s["resumed_from"] == 24 and s["passes"]["decoded"] == (120 - 24) + 120   # the rest, then the IoU pass
    assert _tables(store) == uninterrupted


class _Killed(BaseException):
    """Stands for SIGKILL: no handler of the dissect's catches it, so only what was saved stays."""


def _crops_stop_at(monkeypatch, at: int, stop, done: list, started=lambda: None):
    """A `stopping` for _stopped_then_resumed: extract_patches whose encoder raises `stop` at its
    `at`-th batch of crops (of 43), having recorded the sizes of the batches before in `done`;
    `started()` is called as the patch stage begins."""
    def stopping(real):
        def extract(*a, encoders, **k):
            started()
            encode = encoders[0].encode_images

            def stops_at(x):
                if len(done) == at - 1:
                    raise stop
                done.append(len(x))
                return encode(x)

            monkeypatch.setattr(encoders[0], "encode_images", stops_at)
            return real(*a, encoders=encoders, **k)
        return extract
    return stopping


@pytest.mark.parametrize("stop, every, at", [(KeyboardInterrupt, 1e9, 3), (_Killed, 0.0, 30)])
def test_ctrl_c_while_crops_are_encoded_keeps_the_crops_encoded(probe_world, tmp_path, monkeypatch, uninterrupted,
                                                                stop, every, at):
    """Ctrl-C in the patch stage after some batches of crops were encoded (the costly part of a dissect
    on a CPU): the checkpoint saved on the way out keeps those vectors with the pass (a run killed
    outright: its last checkpoint, saved every `checkpoint_every` seconds of the patch stage too), so
    the same call encodes only the other crops, and ends with the tables of an uninterrupted run."""
    args, done = {**ARGS, "checkpoint_every": every}, []
    whole = Store.open(tmp_path / "whole")
    total = dissect(whole, f"probe:cnn@{probe_world.root}", world=probe_world, log=lambda *a: None,
                    **args)["passes"]["encoded_crops"]

    stopping = _crops_stop_at(monkeypatch, at, stop, done)
    s, store = _stopped_then_resumed(probe_world, tmp_path, monkeypatch, "extract_patches", stopping, stop, args)
    # killed: the checkpoint after the last whole chunk of images holds all but the crops after it
    assert s["resumed_from"] == 120 and total - sum(done) <= s["passes"]["encoded_crops"] < total and sum(done) > 0
    if stop is KeyboardInterrupt:
        assert s["passes"]["encoded_crops"] == total - sum(done)
    assert _tables(store) == uninterrupted


def test_the_patch_stage_writes_the_pass_once_then_only_new_crops(probe_world, tmp_path, monkeypatch):
    """Saved after every chunk of crops (checkpoint_every 0) and killed: in the patch stage the
    ended pass was written once, and each save after that wrote only the crops no earlier lot
    holds (rewriting the pass with each lot cost its whole size every time)."""
    import neurostore.pipeline as P

    writes, at, done = [], [], []
    write = P._atomic_write
    monkeypatch.setattr(P, "_atomic_write", lambda path, fn: (writes.append(Path(path).name), write(path, fn))[1])

    stopping = _crops_stop_at(monkeypatch, 30, _Killed, done, started=lambda: at.append(len(writes)))
    spec, real = f"probe:cnn@{probe_world.root}", P.extract_patches
    monkeypatch.setattr(P, "extract_patches", stopping(real))
    store = Store.open(tmp_path / "s")
    with pytest.raises(_Killed):
        dissect(store, spec, world=probe_world, log=lambda *a: None, **{**ARGS, "checkpoint_every": 0.0})
    stage = writes[at[0]:]
    passes = [w for w in stage if w.startswith("dissect-") and w.endswith(".pt") and ".crops-" not in w]
    lots = sorted(Path(store.path, "checkpoints").glob("dissect-*.crops-*.pt"))
    assert len(passes) == 1 and len(lots) == len(stage) - 1 >= 2
    ids = [i for f in lots for lot_ids, _ in torch.load(f, weights_only=False).values() for i in lot_ids]
    assert len(ids) == len(set(ids)) and 0 < len(ids) <= sum(done)
    ckpt = P._Checkpoint(store, passes[0][len("dissect-"):-len(".pt")], 1e9)
    assert ckpt.load() is not None and sorted(ckpt.patch_vectors[next(iter(ckpt.patch_vectors))][0]) == sorted(ids)


def test_ctrl_c_after_the_crops_keeps_every_crop_vector(probe_world, tmp_path, monkeypatch, uninterrupted):
    """Ctrl-C once the crops are all encoded (here in the scores): the same call encodes none."""
    s, store = _stopped_then_resumed(probe_world, tmp_path, monkeypatch, "_scores", _raises(KeyboardInterrupt),
                                     args={**ARGS, "checkpoint_every": 1e9})
    assert s["resumed_from"] == 120 and s["passes"]["encoded_crops"] == 0
    assert _tables(store) == uninterrupted


def test_a_damaged_checkpoint_file_costs_only_what_it_held(tmp_path):
    """The ended pass and each lot of crop vectors are files of their own: a damaged lot loses
    its crops (encoded again), a damaged pass the pass (run again), never the other files."""
    import numpy as np

    from neurostore.pipeline import _Checkpoint

    store = Store.open(tmp_path / "s")
    ckpt = _Checkpoint(store, "w", every=0.0)
    vec = {"enc": (["a", "b"], [torch.ones(2, 3)])}
    ckpt.save_ended(lambda: {"position": 7}, vec)
    vec["enc"][0].append("c")
    vec["enc"][1].append(torch.full((1, 3), 2.0))
    ckpt.save_ended(lambda: {"position": 8}, vec)   # the pass is not written again: it has ended
    lots = sorted(Path(store.path, "checkpoints").glob("dissect-w.crops-*.pt"))
    assert len(lots) == 2

    again = _Checkpoint(store, "w", every=0.0)
    assert again.load() == {"position": 7} and again.patch_vectors["enc"][0] == ["a", "b", "c"]
    np.testing.assert_array_equal(again.patch_vectors["enc"][1], [[1, 1, 1], [1, 1, 1], [2, 2, 2]])

    lots[0].write_bytes(b"not a checkpoint")
    again = _Checkpoint(store, "w", every=0.0)
    assert again.load() == {"position": 7} and again.patch_vectors["enc"][0] == ["c"]
    again.path.write_bytes(b"")
    again = _Checkpoint(store, "w", every=0.0)
    assert again.load() is None and again.patch_vectors["enc"][0] == ["c"]
    again.remove()
    assert not list(Path(store.path, "checkpoints").iterdir())
