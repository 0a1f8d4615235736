"""Build script: the two pure-Python packages (``fsmtl_kernels`` and ``fsmtl`` from ``python/``)
plus, when torch is importable at build time, the optional C++/OpenMP extension
``fsmtl_kernels._C`` (set ``FSMTL_BUILD_CPP=0`` to skip it).

A failed extension build never fails the install: the package then runs its ops through the
reference backend, and importing the ``cpp`` backend warns once naming the cause.
"""

import os
import sys
from glob import glob

from setuptools import find_packages, setup

packages = find_packages(include=["fsmtl_kernels", "fsmtl_kernels.*"])
packages += find_packages("python", include=["fsmtl", "fsmtl.*"])


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (fsmtl-kernels): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _cpp_extension() -> tuple[list, dict]:
    """The ``fsmtl_kernels._C`` extension and its build command, or nothing when it cannot be built."""
    if os.environ.get("FSMTL_BUILD_CPP", "1") == "0":
        _warn("FSMTL_BUILD_CPP=0: the C++ CPU backend is not built; ops use the reference on CPU.")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        _warn(
            f"torch is not importable at build time ({exc}); the C++ CPU backend is not built. Install torch "
            "first, then `pip install --no-build-isolation -e .`."
        )
        return [], {}

    if sys.platform == "win32":
        cflags, ldflags = ["/O2", "/openmp"], []
    else:
        cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, here) for p in glob(os.path.join(here, "csrc", "*.cpp")))
    extension = CppExtension(
        "fsmtl_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """Builds the extension, or warns and leaves a pure-Python install when the compiler fails."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure must not fail the install
                _warn(
                    f"building the C++ CPU backend failed ({type(exc).__name__}: {exc}); the package is installed "
                    "without it and runs its ops through the reference on CPU."
                )

    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _cpp_extension()

setup(packages=packages, package_dir={"fsmtl": "python/fsmtl"}, ext_modules=ext_modules, cmdclass=cmdclass)
