"""The repository root never shadows an installed distribution.

``python`` and ``python -m pytest`` put the working directory first on ``sys.path``. A regular package at the repository
root with the import name of an installed distribution then wins over the installed one: a top-level
``kernels/__init__.py`` made transformers ≥ 5 import saefast's Triton folder instead of PyPI's ``kernels``. The Triton
sources live in ``kernels/saefast_triton/`` (installed as ``saefast.kernels``) and ``kernels/`` is not a package. The
wheel's contents and an install outside the repository are checked by ``.ci/check_wheel.sh``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _importable_from_root() -> dict[str, Path]:
    """The top-level names a regular import resolves in the repository root: ``*.py`` modules and folders with an
    ``__init__.py`` (folders without one are namespace portions, which any installed regular package outranks)."""
    names = {p.stem: p for p in ROOT.glob("*.py")}
    names.update({p.parent.name: p.parent for p in ROOT.glob("*/__init__.py")})
    return names


def test_no_regular_package_at_the_root_has_an_installed_distributions_name():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in _importable_from_root()
               if name in installed and set(installed[name]) != {"saefast"}}
    assert not clashes, (f"these files or folders at the repository root shadow installed distributions for "
                         f"anything run from the root (import name: distributions): {clashes}")


def test_saefast_triton_sources_are_not_a_top_level_package():
    assert (ROOT / "kernels" / "saefast_triton" / "topk_encode.py").is_file()
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the repo root's kernels/ a regular package that shadows PyPI's kernels")


def _run_from_root(code: str) -> dict:
    """Run ``python -c code`` with the repository root as working directory (so first on ``sys.path``, as for a
    user's ``python`` or ``python -m pytest`` there); the code prints one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, f"python -c from the repo root failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_from_the_repo_root_kernels_is_the_installed_distribution():
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (the hf extra)")
    seen = _run_from_root("""
        import importlib.metadata, json, sys
        import transformers.integrations.hub_kernels  # imports PyPI kernels where transformers >= 5 has it
        import saefast.kernels, saefast.kernels.topk_encode
        try:
            dist = importlib.metadata.distribution("kernels")
        except importlib.metadata.PackageNotFoundError:
            dist = None
        import kernels
        print(json.dumps({
            "sys_path_0": sys.path[0],
            "kernels_file": kernels.__file__,
            "kernels_dist_file": str(dist.locate_file("kernels/__init__.py")) if dist else None,
            "saefast_kernels_file": saefast.kernels.topk_encode.__file__,
        }))
    """)
    assert seen["sys_path_0"] == "", "python -c should put the working directory first on sys.path"
    if seen["kernels_dist_file"] is not None:
        assert seen["kernels_file"] is not None and \
            Path(seen["kernels_file"]).resolve() == Path(seen["kernels_dist_file"]).resolve(), (
                f"from the repo root, `import kernels` gave {seen['kernels_file']}, not PyPI's "
                f"{seen['kernels_dist_file']}")
        assert "site-packages" in Path(seen["kernels_file"]).parts
    else:  # no PyPI kernels: the root's kernels/ may only be a namespace portion (no module file of its own)
        assert seen["kernels_file"] is None
    assert Path(seen["saefast_kernels_file"]).name == "topk_encode.py"


def test_every_subpackage_ships_in_the_wheel():
    """pyproject.toml lists the packages explicitly (saefast.kernels comes from another folder): a new subpackage
    left out of the list would import here, from the source tree, and be missing from the wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(root).parts) for init in (root / "saefast").rglob("__init__.py")
             if "__pycache__" not in init.parts}
    assert found - listed == set(), f"add {sorted(found - listed)} to [tool.setuptools] packages"
