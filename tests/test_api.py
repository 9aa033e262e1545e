"""`import neurostore as ns` is the whole API, and importing it stays light."""

import subprocess
import sys

import pytest

import neurostore as ns


def test_every_public_name_resolves():
    for name in ns.__all__:
        assert getattr(ns, name) is not None, name
    assert issubclass(ns.errors.StoreDamaged, ns.NeurostoreError)


def test_no_submodule_shadows_a_public_function():
    # importing a submodule binds it on the package: a module named like a public function (once
    # neurostore/evaluate.py) replaced ns.evaluate after anything imported it ('module' not callable)
    code = ("import importlib, pkgutil, types, neurostore as ns\n"
            "for m in pkgutil.walk_packages(ns.__path__, 'neurostore.'):\n"
            "    if '.world.' not in m.name and not m.name.endswith('__main__'):\n"
            "        importlib.import_module(m.name)\n"
            "bad = [n for n, (_, attr) in ns._API.items() if attr and isinstance(getattr(ns, n), types.ModuleType)]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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
