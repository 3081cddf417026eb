"""The CPU dtype default: float32 only when nothing was asked for, on the
CPU platform, and the CPU has no native bf16."""

from __future__ import annotations

import pytest

from vllm_stateful.cpu_dtype import cpu_dtype, cpu_flags, has_native_bf16

AVX2_EPYC = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_NO_BF16 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512_vnni"}


@pytest.mark.parametrize(
    "flags, native",
    [
        (AVX2_EPYC, False),
        (AVX512_NO_BF16, False),
        (SAPPHIRE_RAPIDS, True),
        (AVX2_EPYC | {"avx512_bf16"}, True),
        (AVX2_EPYC | {"amx_bf16"}, True),
        ({"fp", "asimd", "bf16"}, True),  # Arm "Features"
    ],
)
def test_native_bf16(flags, native):
    assert has_native_bf16(flags) is native


@pytest.mark.parametrize(
    "requested, is_cpu, flags, chosen",
    [
        (None, True, AVX2_EPYC, "float32"),
        ("auto", True, AVX2_EPYC, "float32"),
        ("auto", True, AVX512_NO_BF16, "float32"),
        ("auto", True, SAPPHIRE_RAPIDS, None),  # vLLM's default stands
        ("auto", False, AVX2_EPYC, None),  # CUDA: vLLM's default stands
        ("auto", True, None, None),  # flags unknown: change nothing
        ("bfloat16", True, AVX2_EPYC, None),  # explicit: kept
        ("float16", True, AVX2_EPYC, None),
        ("float32", True, SAPPHIRE_RAPIDS, None),
    ],
)
def test_cpu_dtype(requested, is_cpu, flags, chosen):
    assert cpu_dtype(requested, is_cpu, flags) == chosen


def test_cpu_flags_reads_x86_and_arm(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(arm)) == {"fp", "asimd", "bf16"}
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_engine_args_keep_an_explicit_dtype_and_default_on_this_cpu():
    from vllm_stateful import stateful_engine_args

    assert stateful_engine_args(model="m", dtype="bfloat16").dtype == "bfloat16"
    from vllm.platforms import current_platform

    expected = cpu_dtype(None, current_platform.is_cpu(), cpu_flags()) or "auto"
    assert stateful_engine_args(model="m").dtype == expected
