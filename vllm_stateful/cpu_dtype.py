"""float32 by default on CPUs without native bf16.

vLLM's ``--dtype auto`` takes the checkpoint's dtype, usually bfloat16. On
an x86 CPU without AVX512-BF16 or AMX-BF16, oneDNN has no bf16 kernels and
falls back to plain torch: SmolLM2 ingested ~64 tokens/s in bfloat16 against
~250 tokens/s in float32 on an AVX2-only EPYC (question latency, decode
bound, was about the same). Ingestion is this project's hot path, so when
the user did not choose a dtype and the CPU lacks native bf16 we choose
float32. With native bf16, or on a GPU, vLLM's default stands.
"""

from __future__ import annotations

from collections.abc import Iterable

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16,
# Arm's BF16 extension ("Features" line).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The first CPU's feature flags, or None when they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def has_native_bf16(flags: Iterable[str]) -> bool:
    return not NATIVE_BF16_FLAGS.isdisjoint(flags)


def cpu_dtype(requested: str | None, is_cpu: bool, flags: Iterable[str] | None) -> str | None:
    """The dtype to use instead of vLLM's default, or None to keep it.

    Only when nothing was requested (None, or vLLM's own default ``auto``),
    the platform is the CPU, and its flags are known and show no native bf16.
    """
    if requested not in (None, "auto") or not is_cpu or flags is None:
        return None
    return None if has_native_bf16(flags) else "float32"


def default_dtype(requested: str | None) -> str | None:
    """``requested``, or float32 where :func:`cpu_dtype` says so (logged)."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    chosen = cpu_dtype(requested, current_platform.is_cpu(), cpu_flags())
    if chosen is None:
        return requested
    # Under "vllm.": loggers outside vLLM's tree have no handler at INFO.
    init_logger("vllm." + __name__).info(
        "vllm-stateful: dtype %s: this CPU has no native bf16 (no avx512_bf16 or amx_bf16 "
        "in /proc/cpuinfo), where bfloat16 runs several times slower; pass --dtype to "
        "choose another",
        chosen,
    )
    return chosen
