"""Build script: the pure-Python package plus one pybind11/OpenMP extension, ``ewc_fast._C``.

``kernels/`` (Triton kernels) lives at the top level of the repository but is installed as the
sub-package ``ewc_fast.kernels`` through ``package_dir``; no top-level ``kernels`` module is created.
The extension needs no torch headers: the Python side validates tensors and passes raw pointers.
"""

import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

# EWC_FAST_BUILD_JOBS=N compiles the csrc/ files in N threads (scripts/gpu_check.sh uses the card
# machine's cores); default 1, the plain serial build.
ParallelCompile("EWC_FAST_BUILD_JOBS", default=1).install()

# -fno-trapping-math lets gcc vectorise the selects; -fno-math-errno lets it vectorise std::sqrt (the
# fused optimizer step) instead of calling libm for errno's sake -- neither changes a computed value
extra_compile = ["-O3", "-fopenmp", "-std=c++17", "-fno-trapping-math", "-fno-math-errno"]
extra_link = ["-fopenmp"]
if os.environ.get("EWC_FAST_NATIVE", "0") == "1":  # opt-in: tune for the build machine
    extra_compile.append("-march=native")
if os.environ.get("EWC_FAST_SANITIZE", "0") == "1":  # scripts/sanitize.sh: ASan + UBSan build of the extension
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]
    extra_compile = [f for f in extra_compile if f != "-O3"] + ["-O1", *san]
    extra_link = extra_link + san
if sys.platform == "darwin":  # Apple clang needs libomp; keep the build working without it
    extra_compile = ["-O3", "-std=c++17"]
    extra_link = []

ext_modules = [
    Pybind11Extension(
        "ewc_fast._C",
        sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
        include_dirs=["csrc"],
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
        cxx_std=17,
    )
]

setup(
    packages=find_packages(include=["ewc_fast", "ewc_fast.*"]) + ["ewc_fast.kernels"],
    package_dir={"ewc_fast": "ewc_fast", "ewc_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
    zip_safe=False,
)
