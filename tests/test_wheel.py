"""`pip install neurostore` from a wheel works: the wheel carries schema/ and queries/, and the
installed package (not this checkout) runs the fast demo (the session's demo store, which most
tests read, is its output: conftest.demo_run) and answers a named query.

Every command runs outside the checkout, so nothing can be imported from the source tree by
accident."""

import json
import os
import subprocess
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(installed_wheel) -> Path:
    return installed_wheel[0]


@pytest.fixture(scope="module")
def venv(installed_wheel) -> Path:
    return installed_wheel[1]


def test_wheel_ships_every_package_and_the_sql(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("schema", "queries"):
        for f in (REPO / folder).rglob("*.sql"):  # subfolders too (schema/derived/)
            rel = f.relative_to(REPO / folder).as_posix()
            assert f"neurostore/_sql/{folder}/{rel}" in names, f"{folder}/{rel} missing from the wheel"
    assert "neurostore/_sql/schema/version.txt" in names
    # Every package of the source tree is listed in pyproject (they are listed, not found).
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for init in (REPO / "neurostore").rglob("__init__.py"):
        pkg = ".".join(init.parent.relative_to(REPO).parts)
        assert pkg in listed, f"package {pkg} is not listed in pyproject.toml [tool.setuptools] packages"
        assert f"{pkg.replace('.', '/')}/__init__.py" in names


def _run(venv: Path, *args, cwd, env=None, timeout=600):
    return subprocess.run([str(venv / "bin" / "python"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def test_installed_wheel_imports_from_itself(venv, tmp_path):
    r = _run(venv, "-c", "import neurostore, neurostore.resources as r; print(neurostore.__file__); "
                         "print(r.sql_dir('schema')); print(r.sql_dir('queries'))", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pkg, schema, queries = r.stdout.split()
    assert str(venv) in pkg and str(venv) in schema and str(venv) in queries, r.stdout
    assert not pkg.startswith(str(REPO))


def test_installed_wheel_runs_the_fast_demo_and_a_named_query(venv, demo_run, tmp_path):
    """The session's demo store (conftest.demo_run) is `neurostore demo --fast` run from this
    virtualenv; the installed package answers a named query on it."""
    summary, store = demo_run
    assert summary["answers"], "the demo answered no question"
    r = _run(venv, "-m", "neurostore.cli", "query", "evaluation_summary", "--store", str(store.path),
             "--format", "json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert rows and {"probe-cnn", "probe-vit"} <= {row["model"] for row in rows}
