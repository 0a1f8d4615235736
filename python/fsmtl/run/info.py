"""What this installation is and runs on: ``fsmtl info``, and the ``environment`` block of
``results.json`` (versions, machine, threads)."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

# Environment variables that set thread counts or the kernels' backend.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "FSMTL_BACKEND", "FSMTL_CPP_JIT")


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """fsmtl-kernels, torch, triton (None when not installed), numpy and Python."""
    import torch

    return {
        "fsmtl-kernels": package_version("fsmtl-kernels"),
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "python": platform.python_version(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict:
    """CPU model and cores, torch's thread count, the OS, and the device (with its name on CUDA)."""
    import torch

    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        pass
    return info


def environment(device: str = "cpu") -> dict:
    """The ``environment`` block of ``results.json``."""
    return {
        "versions": versions(),
        "machine": machine(device),
        "env": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
    }


def report() -> str:
    """The text ``fsmtl info`` prints."""
    import torch

    import fsmtl_kernels as fk
    from fsmtl_kernels import cpp

    lines = ["versions:"]
    for name, version in versions().items():
        lines.append(f"  {name}: {version or 'not installed'}")
    lines.append(f"  python executable: {sys.executable}")
    lines.append("machine:")
    host = machine()
    lines.append(f"  cpu: {host['cpu']} ({host['logical_cpus']} logical, {host['usable_cpus']} usable by this process)")
    lines.append(f"  platform: {host['platform']}")
    if "load_average" in host:
        lines.append(f"  load average (1, 5, 15 min): {', '.join(map(str, host['load_average']))}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    lines.append("backends (auto picks triton on CUDA, cpp on CPU when available, else reference):")
    for device in devices:
        name = f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""
        lines.append(f"  {device}{name}: {', '.join(fk.available_backends(device))}")
    if not torch.cuda.is_available():
        lines.append("  cuda: not available to torch (torch.cuda.is_available() is False)")
    reason = cpp.unavailable_reason(torch.device("cpu"))
    lines.append("C++ extension (fsmtl_kernels._C):")
    if reason is None:
        lines.append("  built and loaded")
    else:
        lines.append(f"  not available: {reason}")
        recorded = cpp.build_error()
        if recorded is not None:
            lines.append(f"  build error recorded at install time ({cpp.BUILD_ERROR_FILE}), first lines:")
            lines += [f"    {line}" for line in recorded.splitlines()[:12]]
    lines.append("threads:")
    lines.append(f"  torch.get_num_threads(): {torch.get_num_threads()}")
    lines.append(f"  torch.get_num_interop_threads(): {torch.get_num_interop_threads()}")
    lines.append(f"  ATen parallel backend: {torch.__config__.parallel_info().splitlines()[-1].split(':')[-1].strip()}")
    for name in THREAD_VARIABLES:
        lines.append(f"  {name}: {os.environ.get(name, '(unset)')}")
    return "\n".join(lines)
