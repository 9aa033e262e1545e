"""`pip install neurostore` from a wheel works: the wheel carries schema/ and queries/, and the
installed package (not this checkout) answers a named query and runs the fast demo.

The fresh virtualenv gets the wheel itself; its dependencies (torch & co., gigabytes) are borrowed
from the test environment through a path entry rather than downloaded again. Every command runs
outside the checkout, so nothing can be imported from the source tree by accident."""

import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: setuptools is in the test environment; no index is needed.
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300,
                       cwd=out)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("neurostore-*.whl")
    return whl


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


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    py = root / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies, from this environment's site-packages (a plain path entry: its .pth
    # files, among them the editable install of the checkout, are not processed).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "_deps.pth").write_text("\n".join(deps) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return root


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


def test_installed_wheel_runs_the_fast_demo_and_a_named_query(venv, tmp_path, probe_world, probe_world_cache):
    store = tmp_path / "store"
    env = {"NEUROSTORE_CACHE": str(probe_world_cache)}
    r = _run(venv, "-m", "neurostore.cli", "demo", "--fast", "--json", "--store", str(store),
             "--cache", str(probe_world_cache), cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["answers"], "the demo answered no question"
    r = _run(venv, "-m", "neurostore.cli", "query", "evaluation_summary", "--store", str(store),
             "--format", "json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert rows and {"probe-cnn", "probe-vit"} <= {row["model"] for row in rows}
