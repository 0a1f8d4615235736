"""Build script: the two pure-Python packages (``fsmtl_kernels`` and ``fsmtl`` from ``python/``)
plus, when torch is importable at build time, the optional C++/OpenMP extension
``fsmtl_kernels._C`` (set ``FSMTL_BUILD_CPP=0`` to skip it)."""

from setuptools import find_packages, setup

packages = find_packages(include=["fsmtl_kernels", "fsmtl_kernels.*"])
packages += find_packages("python", include=["fsmtl", "fsmtl.*"])

setup(packages=packages, package_dir={"fsmtl": "python/fsmtl"})
