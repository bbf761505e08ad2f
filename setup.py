"""Build script. Metadata lives in pyproject.toml; this file exists for the native extension.

The C++/CUDA extension (csrc/, issue #5) is not built yet: until it lands, saefast is pure Python and
every op runs on the eager PyTorch reference (saefast.ref).
"""

from setuptools import setup

setup()
