"""The architecture, beyond the layer contracts that ``lint-imports`` checks (pyproject.toml, run by ``make test``).

* No module imports a private name (``_x``) from another module: what crosses a module boundary is public.
* The Triton kernels (``kernels/saefast_triton/``, installed as ``saefast.kernels``) import nothing of saefast:
  they are the bottom layer, below ``saefast.ops`` (grimp does not see them in an editable install).
* The data layer never needs the native extension: ``saefast harvest --help`` and opening and reading a store
  leave ``saefast._C`` unloaded.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "saefast", ROOT / "kernels" / "saefast_triton"]


def _imports(path: Path) -> list[ast.ImportFrom | ast.Import]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_is_imported_across_modules():
    found = [f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from {'.' * node.level}{node.module or ''}"
             for package in PACKAGES for path in sorted(package.rglob("*.py")) for node in _imports(path)
             if isinstance(node, ast.ImportFrom) for alias in node.names if _private(alias.name)]
    assert not found, "private names imported across modules (make them public or keep them in one module):\n" + \
        "\n".join(found)


def test_the_scan_sees_a_private_import(tmp_path):
    """The scan above is not vacuous: it finds ``from .x import _y`` and ``from x import _y``."""
    module = tmp_path / "m.py"
    module.write_text("from .store import _helper\nfrom saefast.ops.encode import _capacity_warned, topk_encode\n")
    names = [alias.name for node in _imports(module) for alias in node.names if _private(alias.name)]
    assert names == ["_helper", "_capacity_warned"]


def test_the_triton_kernels_import_nothing_of_saefast():
    kernels = PACKAGES[1]
    found = []
    for path in sorted(kernels.rglob("*.py")):
        for node in _imports(path):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                found.append(f"{path.name}:{node.lineno}: a relative import out of the kernels' package")
            found += [f"{path.name}:{node.lineno}: imports {name}" for name in names if name.split(".")[0] == "saefast"]
    assert not found, found


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (outside the repository root); it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT / "tests")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_harvest_help_does_not_load_the_native_extension():
    seen = _run("""
        import contextlib, io, json, sys
        from saefast.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["harvest", "--help"])  # argparse's exit becomes main's status
        print(json.dumps({"code": code, "usage": "usage: saefast harvest" in out.getvalue(),
                          "native": "saefast._C" in sys.modules}))
    """)
    assert seen == {"code": 0, "usage": True, "native": False}


def test_opening_and_reading_a_store_does_not_load_the_native_extension(tmp_path):
    """Opening a store and reading rows leave saefast._C unloaded; the first batch of ``batches`` loads it (its
    row gather is the fast path of the reader)."""
    import torch

    from saefast.data.store import write_store

    write_store(tmp_path / "store", torch.randn(40, 8), shard_tokens=16)
    seen = _run(f"""
        import json, sys
        from saefast.data.store import ActivationStore
        store = ActivationStore({str(tmp_path / "store")!r}, verify="eager")
        first = store.read(0, 2).shape[0]
        after_read = "saefast._C" in sys.modules
        rows = sum(batch.shape[0] for batch in store.batches(16, seed=0))
        print(json.dumps({{"rows": rows, "first": first, "after_read": after_read}}))
    """)
    assert seen == {"rows": 40, "first": 2, "after_read": False}


def test_store_batches_are_the_same_without_the_native_extension(tmp_path):
    """Without the extension (not built, or built for another torch) the reader gathers on the torch path, with
    one warning, and yields the same batches bit for bit."""
    import torch

    from saefast.data.store import ActivationStore, write_store

    write_store(tmp_path / "store", torch.randn(300, 8), shard_tokens=64, dtype=torch.bfloat16)
    want = [batch.tolist() for batch in ActivationStore(tmp_path / "store").batches(32, seed=4, shuffle_buffer=100,
                                                                                   block_rows=16)]
    seen = _run(f"""
        import json, sys, warnings
        sys.modules["saefast._C"] = None  # an import of it now fails, as when it was not built
        from saefast.data.store import ActivationStore
        store = ActivationStore({str(tmp_path / "store")!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batches = [batch.tolist() for batch in store.batches(32, seed=4, shuffle_buffer=100, block_rows=16)]
        print(json.dumps({{"batches": batches, "warned": [str(w.message)[:60] for w in caught]}}))
    """)
    assert seen["batches"] == want
    assert seen["warned"] == ["saefast: the native extension saefast._C could not be loaded"]


def test_the_extension_loads_when_a_native_op_first_needs_it():
    """Lazy, not absent: resolving the ``native`` backend (or ``auto`` on the CPU) loads it."""
    seen = _run("""
        import json, sys, torch
        import saefast as sf
        before = "saefast._C" in sys.modules
        x = torch.randn(6, 8)
        sf.SAE(sf.SAEConfig(d_in=8, n_latents=16, k=2)).encode(x)  # auto on the CPU: native when it is built
        print(json.dumps({"before": before, "after": "saefast._C" in sys.modules,
                          "available": sf.native.available()}))
    """)
    assert seen["before"] is False
    assert seen["after"] is seen["available"]
