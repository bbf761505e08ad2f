#!/usr/bin/env bash
# saefast as a library, not only as an editable checkout:
#   1. build the wheel as a user would (pip wheel --no-build-isolation, against the build venv's torch);
#   2. check what it carries: every module of saefast/ and the browser's pages (saefast/browse/assets/), the
#      compiled extension saefast/_C*.so, every Triton source of kernels/saefast_triton/ as saefast/kernels/, and no
#      top-level module but saefast (a top-level `kernels` would shadow PyPI's);
#   3. install it into a clean venv (torch first, then the wheel with its core dependencies only, versions from the
#      constraints file) and use it from a directory outside the repository: saefast imports from that venv, its
#      native backend loads and agrees with the torch backend, saefast.kernels holds the Triton files, and the
#      `saefast --help` entry point runs.
# Environment: PYTHON (the build venv's python, default .venv/bin/python), BASE_PYTHON (makes the clean venv,
# default python3.11), CONSTRAINTS (default constraints.txt; empty for none), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
PYTHON=${PYTHON:-.venv/bin/python}
BASE_PYTHON=${BASE_PYTHON:-python3.11}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
constraint=()
if [ -n "$CONSTRAINTS" ]; then constraint=(--constraint "$root/$CONSTRAINTS"); fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

# Built from a copy of the files git tracks or would track (a clean clone plus uncommitted work): an in-tree build
# would reuse build/lib, where modules deleted since the last build linger and would ship.
mkdir "$tmp/src"
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done |
    xargs -0 cp --parents --target-directory="$tmp/src"
# ninja from the build venv, when it has one: torch.utils.cpp_extension looks for it on PATH.
bin=$(cd "$(dirname "$PYTHON")" && pwd)
(cd "$tmp/src" && PATH="$bin:$PATH" "$bin/$(basename "$PYTHON")" -m pip wheel --quiet --no-build-isolation --no-deps \
    --wheel-dir "$tmp/dist" .)
wheels=("$tmp"/dist/saefast-*.whl)
wheel=${wheels[0]}
echo "check_wheel: built $(basename "$wheel") ($(( $(date +%s) - start )) s)"

"$PYTHON" - "$wheel" <<'EOF'
import pathlib
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
kernels = sorted(p.name for p in pathlib.Path("kernels/saefast_triton").glob("*.py"))
missing = [f"saefast/kernels/{k}" for k in kernels if f"saefast/kernels/{k}" not in names]
assert "topk_encode.py" in kernels and not missing, f"the wheel lacks Triton sources: {missing}"
modules = sorted(str(p) for p in pathlib.Path("saefast").rglob("*.py"))
absent = [m for m in modules if m not in names]
assert not absent, f"the wheel lacks these modules (a subpackage missing from pyproject's packages?): {absent}"
assets = sorted(str(p) for p in pathlib.Path("saefast/browse/assets").iterdir())
absent = [a for a in assets if a not in names]
assert assets and not absent, f"the wheel lacks the feature browser's pages (pyproject's package-data?): {absent}"
extension = [n for n in names if n.startswith("saefast/_C.") and n.endswith(".so")]
assert len(extension) == 1, f"the wheel should carry one compiled saefast/_C*.so, found {extension}"
top = sorted({n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")})
assert top == ["saefast"], f"the wheel installs top-level names other than saefast: {top}"
print(f"check_wheel: contents ok ({len(names)} files: {len(modules)} modules of saefast/, {extension[0]}, "
      f"saefast/kernels/ x {len(kernels)})")
EOF

"$BASE_PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet "${constraint[@]}" "$TORCH_SPEC"
"$tmp/venv/bin/pip" install --quiet "${constraint[@]}" "$wheel"
mkdir "$tmp/elsewhere"
cd "$tmp/elsewhere"
env -u PYTHONPATH "$tmp/venv/bin/python" - "$tmp/venv" <<'EOF'
import importlib.resources
import pathlib
import sys

import torch

import saefast as sf

venv = pathlib.Path(sys.argv[1]).resolve()
assert venv in pathlib.Path(sf.__file__).resolve().parents, f"saefast imported from {sf.__file__}, not {venv}"
assert sf.native.available(), f"saefast._C did not load: {sf.native.why_unavailable()}"
kernel_files = {p.name for p in importlib.resources.files("saefast.kernels").iterdir()}
assert {"topk_encode.py", "sparse_decode.py", "sparse_decode_backward.py"} <= kernel_files, kernel_files
x = torch.randn(37, 24)
sae = sf.SAE(sf.SAEConfig(d_in=24, n_latents=96, k=5, activation="topk"), seed=0)
with torch.no_grad():
    native = sae.reconstruct(x, backend="native")
    eager = sae.reconstruct(x, backend="torch")
err = float((native - eager).abs().max())
assert err < 1e-5, f"native reconstruction differs from the torch backend by {err}"
print(f"check_wheel: installed saefast {sf.__version__} imports from {venv.name}/, native backend ok "
      f"(max |native - torch| = {err:.1e})")
EOF
"$tmp/venv/bin/saefast" --help >"$tmp/help.txt"
grep -q "usage: saefast" "$tmp/help.txt" || { cat "$tmp/help.txt"; echo "check_wheel: saefast --help printed no usage"; exit 1; }
echo "check_wheel: 'saefast --help' ok; all checks passed ($(( $(date +%s) - start )) s)"
