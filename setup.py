"""Build script. Metadata lives in pyproject.toml; this file builds the native extension ``saefast._C`` (csrc/).

* The C++ part (CPU kernels, op schemas) is built everywhere: ``-O3``, OpenMP, ``-fno-math-errno``,
  ``-march=native`` (the extension is compiled on the machine that runs it; set ``SAEFAST_PORTABLE=1`` to build
  without it).
* The CUDA part (csrc/cuda/*.cu, bound in csrc/cuda_bindings.cpp) is added when torch was built with CUDA and the
  CUDA toolkit is found; it targets sm_80 and sm_90a unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.
* ``SAEFAST_NO_EXTENSION=1`` skips the extension: saefast then runs on its torch (and Triton) backends and says so
  once at import.
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("SAEFAST_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # -fno-math-errno: sqrt never sets errno, so loops that take square roots vectorise (the fused Adam step); the
    # results are the same (sqrt is correctly rounded either way)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("SAEFAST_PORTABLE") != "1":
        cxx.append("-march=native")
    sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        sources += ["csrc/cuda_bindings.cpp", *sorted(glob.glob("csrc/cuda/*.cu"))]
        ext = cpp_extension.CUDAExtension(
            "saefast._C", sources, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension("saefast._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
