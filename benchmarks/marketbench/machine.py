"""What every benchmark records about the machine and the software: CPU
model and the flags that decide CPU kernels, cores, memory, versions."""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

# CPU flags that change what the engines' kernels do (bf16, AMX, AVX512).
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, list[str]]:
    """(CPU model, which of KERNEL_FLAGS it has)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model, [f for f in KERNEL_FLAGS if f in flags]


def machine(model: str | None = None) -> str:
    import psutil

    model = model or cpu_info()[0]
    gpu = "no GPU" if not os.path.exists("/dev/nvidia0") else "NVIDIA GPU present"
    return (f"{model}, {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{gpu}, {platform.system()} {platform.release()}")  # fmt: skip


def version_of(*dists: str) -> str | None:
    """The installed version of the first of ``dists`` that is installed."""
    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None
