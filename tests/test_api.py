"""`import neurostore as ns` is the whole API, and importing it stays light."""

import subprocess
import sys

import pytest

import neurostore as ns


def test_every_public_name_resolves():
    for name in ns.__all__:
        assert getattr(ns, name) is not None, name
    assert issubclass(ns.errors.StoreDamaged, ns.NeurostoreError)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ns.nope  # noqa: B018


def test_import_does_not_load_torch():
    # The CLI's --help and plain SQL users should not pay torch's import time.
    out = subprocess.run([sys.executable, "-c", "import sys, neurostore; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_store_first(tmp_path):
    store = ns.open(tmp_path / "s")
    assert isinstance(store, ns.Store)
    assert store.sql("SELECT 1 AS x").column("x")[0].as_py() == 1
