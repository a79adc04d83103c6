"""A notebook starts in a Colab-like kernel: torch already installed, fer_lib not.

One slow end-to-end check, in a fresh virtual environment under tmp_path:

1. the environment already holds pip, torch and torchvision (and what they require), the way
   Colab ships them: the running interpreter's installed copies are hard-linked in (seconds, no
   download; a plain ``pip install torch==... torchvision==...`` where hard links are impossible);
2. a copy of this checkout (the files git would commit) is built into a wheel, and
   ``pip install <wheel> papermill ipykernel`` (not editable) installs fer_lib's dependencies
   from pyproject.toml and must leave torch alone: same version, same files, no torch download;
3. fer_lib is uninstalled again, and notebook 02 runs under papermill with a kernelspec of that
   environment, from a folder outside the repository: its setup cell installs fer_lib from
   ``$FER_LIB_PIP`` (that wheel) and finds the data through ``$FER2013_PATH`` (a small generated
   CSV); the notebook's run folder then lands under ``./runs/`` of that folder.

Skipped when the package index cannot be reached. Downloads about 150 MB of wheels (pandas,
scipy, opencv, wandb, optuna, papermill, ...) unless pip's cache or a local index holds them.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import nbformat
import pytest

from fer_lib import synthetic

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_mlp_baseline.ipynb"
KERNEL = "fer-colab-test"
PREINSTALLED = ("torch", "torchvision")  # what Colab ships and fer_lib must not reinstall


def _run(cmd, *, env=None, cwd=None, timeout=900) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    result = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    print(f"[{time.perf_counter() - start:6.1f} s] {' '.join(Path(str(c)).name for c in cmd[:6])}")
    return result


def _index_unreachable() -> str | None:
    """Why pip's package index cannot be reached, or None when it can."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                capture_output=True, text=True)
        url = config.stdout.strip() if config.returncode == 0 and config.stdout.strip() else "https://pypi.org/simple"
    probe = url.rstrip("/") + "/pip/"
    try:
        with urllib.request.urlopen(probe, timeout=15) as response:
            response.read(1)
    except Exception as exc:  # noqa: BLE001 - any failure means: no index, skip
        return f"package index {url} unreachable ({type(exc).__name__}: {exc})"
    return None


def _preinstalled_closure(names) -> list[metadata.Distribution]:
    """The installed distributions of ``names`` and all they require (markers and extras applied)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(name, "") for name in names]
    while todo:
        name, extra = todo.pop()
        name = canonicalize_name(name)
        if (name, extra) in done:
            continue
        done.add((name, extra))
        try:
            dist = seen.get(name) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional requirement that is not installed here
        seen[name] = dist
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return list(seen.values())


def _site_packages(python: Path) -> Path:
    out = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout
    return Path(out.strip())


def _preinstall(python: Path, site: Path) -> str:
    """Put pip, torch and torchvision (with what they require) into the new environment, as
    Colab ships them: hard links to the running interpreter's installed files (same Python)."""
    dists = _preinstalled_closure(PREINSTALLED + ("pip",))
    linked: list[Path] = []
    try:
        for dist in dists:
            base = Path(dist.locate_file("")).resolve()
            for entry in dist.files or []:
                src = Path(os.path.normpath(base / entry))
                if base not in src.parents or not src.is_file():
                    continue  # console scripts in bin/ and the like: not needed here
                dst = site / src.relative_to(base)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(src, dst)  # pip replaces (never rewrites) files, so the source stays intact
                linked.append(dst)
        return f"hard-linked {len(dists)} distributions ({len(linked)} files)"
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    # another file system: install the same versions the ordinary way (about a minute)
    for path in linked:
        path.unlink()
    _run([python, "-m", "ensurepip"])
    pins = [f"{name}=={metadata.version(name).split('+')[0]}" for name in PREINSTALLED]
    _run([python, "-m", "pip", "install", "-q", *pins])
    return "pip install " + " ".join(pins)


_STATE = """
import json, os, importlib.metadata as m, importlib.util as u
state = {}
for name in %r:
    dist = m.distribution(name)
    origin = u.find_spec(name).origin
    record = dist.locate_file(next(f for f in dist.files if f.name == "RECORD"))
    state[name] = [dist.version, origin, os.stat(origin).st_ino, os.stat(record).st_ino]
print(json.dumps(state))
"""


def _torch_state(python: Path) -> dict:
    """Version, location and file identity of the preinstalled packages (without importing them:
    a reinstall, even of the same version, writes new files and so new inodes)."""
    return json.loads(_run([python, "-c", _STATE % (PREINSTALLED,)]).stdout.strip().splitlines()[-1])


def _checkout_copy(dest: Path) -> Path:
    """The working tree's files that git would commit (tracked + untracked, not ignored)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for top in ("fer_lib", "notebooks") for p in (ROOT / top).rglob("*")]
        listed += ["pyproject.toml", "README.md"]
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("tests/", ".ci/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _setup_cell(nb) -> nbformat.NotebookNode:
    """The notebook's first code cell, which must be the setup cell that installs fer_lib."""
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert 'find_spec("fer_lib") is None' in first.source and "FER_LIB_PIP" in first.source, \
        f"{NOTEBOOK.name}: the first code cell is not the setup cell:\n{first.source}"
    return first


@pytest.mark.slow
def test_notebook_starts_in_a_colab_like_kernel(tmp_path):
    reason = _index_unreachable()
    if reason:
        pytest.skip(reason)
    # 1. a fresh environment that already holds pip, torch and torchvision
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    site = _site_packages(python)
    start = time.perf_counter()
    how = _preinstall(python, site)
    print(f"[{time.perf_counter() - start:6.1f} s] {how}")
    before = _torch_state(python)
    for _, origin, _, _ in before.values():
        assert Path(origin).resolve().is_relative_to(site.resolve()), (how, before)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "JUPYTER"))}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", JUPYTER_DATA_DIR=str(tmp_path / "jupyter"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter" / "runtime"),
               IPYTHONDIR=str(tmp_path / "ipython"), MPLCONFIGDIR=str(tmp_path / "mpl"),
               MPLBACKEND="Agg", WANDB_MODE="disabled", FER_LIB_CACHE=str(tmp_path / "cache"))
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    # 2. a plain (non-editable) install of the checkout leaves torch alone. The checkout copy is
    # built once into a wheel, which both this install and the notebook's setup cell install.
    src = _checkout_copy(tmp_path / "src")
    _run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src], env=env, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("fer_lib-*.whl")
    # --no-compile: byte-compiling scipy, pandas, wandb ... on 2 cores costs more than it tests
    pip = _run([python, "-m", "pip", "install", "--no-compile", wheel, "papermill", "ipykernel"],
               env=env, cwd=tmp_path)
    log = pip.stdout + pip.stderr
    for name in PREINSTALLED:
        assert re.search(rf"^Requirement already satisfied: {name}\b", log, re.M), f"{name} not kept:\n{log}"
        touched = re.findall(rf"^.*(?:(?:Collecting|Downloading|Attempting uninstall:|Using cached) {name}\b"
                             rf"|Processing \S*/{name}-\d).*$", log, re.M | re.I)
        assert not touched, f"pip touched {name}:\n" + "\n".join(touched)
    installed = re.search(r"^Successfully installed (.*)$", log, re.M)
    assert installed and re.search(r"\bfer[-_]lib-0", installed.group(1)), log[-3000:]
    assert not re.search(r"\btorch(vision)?-\d", installed.group(1)), installed.group(0)
    assert _torch_state(python) == before

    # 3. notebook 02 from a folder outside the repository; its setup cell installs fer_lib
    _run([python, "-m", "pip", "uninstall", "-y", "fer_lib"], env=env)
    _run([python, "-m", "ipykernel", "install", "--prefix", venv, "--name", KERNEL], env=env)
    outside = tmp_path / "colab_content"
    outside.mkdir()
    env["FER2013_PATH"] = str(synthetic.write_fer2013_csv(tmp_path / "data" / "fer2013.csv"))
    env["FER_LIB_PIP"] = str(wheel)
    notebook = outside / NOTEBOOK.name
    _setup_cell(nbformat.read(NOTEBOOK, as_version=4))
    shutil.copy2(NOTEBOOK, notebook)
    params = {"epochs": 1, "max_steps_per_epoch": 2, "data_fraction": 1.0, "device": "cpu",
              "precision": "fp32", "wandb_mode": "disabled"}
    cmd = [python, "-m", "papermill", notebook.name, "executed.ipynb", "-k", KERNEL, "--cwd", outside]
    for key, value in params.items():
        cmd += ["-p", key, str(value)]
    run = _run(cmd, env=env, cwd=outside)

    results = outside / "runs" / "manual" / "02_mlp_baseline" / "results.json"
    assert results.is_file(), f"no {results}:\n{run.stderr[-3000:]}"
    assert json.loads(results.read_text())
    executed = nbformat.read(outside / "executed.ipynb", as_version=4)
    setup_out = "".join(o.get("text", "") for o in _setup_cell(executed).outputs)
    assert "FER2013: " in setup_out and "fer2013_csv" in setup_out, setup_out  # ensure_fer2013 ran
    where = _run([python, "-c", "import fer_lib, json, importlib.metadata as m; "
                  "print(json.dumps([fer_lib.__file__, m.distribution('fer_lib').read_text('direct_url.json')]))"],
                 env=env, cwd=outside).stdout
    fer_file, direct_url = json.loads(where)
    assert Path(fer_file).resolve().is_relative_to(site.resolve()), fer_file  # installed, not the checkout
    assert not json.loads(direct_url).get("dir_info", {}).get("editable"), direct_url
    assert _torch_state(python) == before
