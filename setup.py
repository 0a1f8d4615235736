"""Build script: the two pure-Python packages (``fsmtl_kernels`` and ``fsmtl`` from ``python/``)
plus, when torch is importable at build time, the optional C++/OpenMP extension
``fsmtl_kernels._C`` (set ``FSMTL_BUILD_CPP=0`` to skip it).

A failed extension build never fails the install: the package then runs its ops through the
reference backend, and importing the ``cpp`` backend warns once naming the cause. Because pip hides
this script's output, the build's compiler output goes to ``fsmtl_kernels/_build.log`` and the
reason for a skipped or failed build (with the compiler's first error lines) to
``fsmtl_kernels/_build_error.txt``, which ``fsmtl_kernels.cpp`` and ``fsmtl info`` read; a
successful build removes the latter.
"""

import os
import re
import sys
from glob import glob

from setuptools import find_packages, setup

packages = find_packages(include=["fsmtl_kernels", "fsmtl_kernels.*"])
packages += find_packages("python", include=["fsmtl", "fsmtl.*"])


HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_ERROR = "_build_error.txt"
BUILD_LOG = "_build.log"


def _warn(message: str) -> None:
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (fsmtl-kernels): {message}\n{bar}\n", file=sys.stderr, flush=True)


def _record_failure(package_dir: str, summary: str, log: str = "") -> None:
    """Write why the extension is missing to ``<package_dir>/_build_error.txt``: one line naming the
    cause (the compiler's first error line when the log has one), then the log from that line on."""
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if re.search(r"\berror\b", line, re.IGNORECASE)), None)
    if first is not None:
        summary = f"C++ build failed: {lines[first].strip()}"
        excerpt = lines[first : first + 20]
    else:
        excerpt = lines[-20:]
    text = summary + ("\n\n" + "\n".join(excerpt) if excerpt else "") + "\n"
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, BUILD_ERROR), "w") as f:
        f.write(text)


def _cpp_extension() -> tuple[list, dict]:
    """The ``fsmtl_kernels._C`` extension and its build command, or nothing when it cannot be built."""
    if os.environ.get("FSMTL_BUILD_CPP", "1") == "0":
        _warn("FSMTL_BUILD_CPP=0: the C++ CPU backend is not built; ops use the reference on CPU.")
        _record_failure(os.path.join(HERE, "fsmtl_kernels"), "not built: FSMTL_BUILD_CPP=0 was set at install time")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        _warn(
            f"torch is not importable at build time ({exc}); the C++ CPU backend is not built. Install torch "
            "first, then `pip install --no-build-isolation -e .`."
        )
        _record_failure(
            os.path.join(HERE, "fsmtl_kernels"),
            f"not built: torch was not importable at build time ({exc}); install torch first, then "
            "`pip install --no-build-isolation -e .`",
        )
        return [], {}

    if sys.platform == "win32":
        cflags, ldflags = ["/O2", "/openmp"], []
    else:
        cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    here = HERE
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
            # The package directory the extension goes to (the source tree for an editable install).
            package_dir = os.path.dirname(self.get_ext_fullpath("fsmtl_kernels._C"))
            os.makedirs(package_dir, exist_ok=True)
            log_path = os.path.join(package_dir, BUILD_LOG)
            try:
                with _output_to(log_path):  # the compiler's output, which pip would hide
                    super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure must not fail the install
                with open(log_path, errors="replace") as f:
                    log = f.read()
                _record_failure(package_dir, f"C++ build failed: {type(exc).__name__}: {exc}".splitlines()[0], log)
                _warn(
                    f"building the C++ CPU backend failed ({type(exc).__name__}: {exc}); the package is installed "
                    f"without it and runs its ops through the reference on CPU. Compiler output: {log_path}"
                )
            else:
                for stale in (os.path.join(package_dir, BUILD_ERROR), os.path.join(HERE, "fsmtl_kernels", BUILD_ERROR)):
                    if os.path.exists(stale):
                        os.remove(stale)

    return [extension], {"build_ext": OptionalBuildExtension}


class _output_to:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so the compiler subprocesses'
    too) to ``path`` while active."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        self.log = open(self.path, "w")  # noqa: SIM115 - closed in __exit__
        os.dup2(self.log.fileno(), 1)
        os.dup2(self.log.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        for fd in self.saved:
            os.close(fd)
        self.log.close()


ext_modules, cmdclass = _cpp_extension()

setup(packages=packages, package_dir={"fsmtl": "python/fsmtl"}, ext_modules=ext_modules, cmdclass=cmdclass)
