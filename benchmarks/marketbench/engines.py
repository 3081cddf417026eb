"""Every engine of the comparison, as its own server is started by users.

Each spec says how its server is launched, which result rows it produces,
what precision it runs, and exactly how it is configured beyond its
defaults (that text goes into the results table). Baselines get their
defaults plus what the workload needs (context length, KV memory, the
machine's cores); nothing is turned off to slow them down.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

SERVED_NAME = "bench"  # one model name on every server, so requests are identical


@dataclass(frozen=True)
class LaunchOptions:
    model_dir: str  # bf16 (or f32) safetensors folder: every vLLM-based engine
    gguf_path: str | None  # the same weights as GGUF, for llama.cpp
    dtype: str  # bfloat16 for SmolLM2, float32 for the tiny smoke model
    eager: bool  # vLLM: skip torch.compile (smoke runs only)
    kv_gib: int  # VLLM_CPU_KVCACHE_SPACE for every vLLM-based engine
    budget_fraction: float  # share of that KV that sessions may pin
    threads: int  # llama.cpp threads (vLLM uses every core by itself)
    max_model_len: int
    kv_cache_dtype: str = "auto"  # vLLM's --kv-cache-dtype (auto: the model's dtype)


@dataclass(frozen=True)
class EngineSpec:
    key: str  # command-line id
    label: str
    rows: tuple[str, ...]  # result rows this engine's run produces
    kind: str  # "stateful" | "openai": how the driver talks to it
    health_path: str

    def precision(self, o: LaunchOptions) -> str:
        if self.key == "llamacpp":
            return "bf16 weights (GGUF), f16 KV"
        dt = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(o.dtype, o.dtype)
        return f"{dt} weights, {dt if o.kv_cache_dtype == 'auto' else o.kv_cache_dtype} KV"

    def configuration(self, o: LaunchOptions) -> str:
        """Everything set beyond the server's defaults, and why."""
        mode = "eager (smoke)" if o.eager else "compiled (default)"
        kv = f"VLLM_CPU_KVCACHE_SPACE={o.kv_gib} (GiB, same for every vLLM engine)"
        return {
            "stateful": f"`vllm-stateful serve`, {mode}, prefix caching on, {kv}, "
            f"VLLM_STATEFUL_BUDGET_FRACTION={o.budget_fraction} (sessions may pin that share of the KV)",
            "vllm-nopc": f"`python -m vllm.entrypoints.openai.api_server`, {mode}, "
            f"`--no-enable-prefix-caching`, {kv}",
            "vllm-pc": f"`python -m vllm.entrypoints.openai.api_server`, {mode}, prefix caching on "
            f"(default), {kv}",
            "llamacpp": f"`python -m llama_cpp.server` (llama-cpp-python 0.3.36, built with AMX off), "
            f"`--n_ctx {o.max_model_len}` (the workload's context; default 2048), "
            f"`--n_threads {o.threads}` (the machine's cores; default is half), "
            "`--cache true` (RAM prompt cache, 2 GiB default size, so each session's prompt "
            "stays cached; the last prompt is always reused), `--logits_all false` (the default "
            "computes vocabulary logits for every prompt token, needed only for logprobs), "
            "`--interrupt_requests false` (the default cuts a streamed answer short as soon as "
            "another request waits, so concurrent sessions would get one-token answers)",
            "sglang": "`python -m sglang.launch_server`, radix cache on (default)",
            "trtllm": "`trtllm-serve` (PyTorch backend), KV cache reuse on (default)",
        }[self.key]

    def command(self, o: LaunchOptions, port: int) -> tuple[list[str], dict[str, str]]:
        """argv and extra environment of this engine's server."""
        py = sys.executable
        common = ["--host", "127.0.0.1", "--port", str(port)]
        vllm_flags = common + [
            "--dtype", o.dtype, "--served-model-name", SERVED_NAME,
            "--max-model-len", str(o.max_model_len), "--disable-uvicorn-access-log",
        ] + (["--enforce-eager"] if o.eager else []) + (
            ["--kv-cache-dtype", o.kv_cache_dtype] if o.kv_cache_dtype != "auto" else [])  # fmt: skip
        vllm_env = {"VLLM_CPU_KVCACHE_SPACE": str(o.kv_gib)}
        if self.key == "stateful":
            script = Path(py).with_name("vllm-stateful")
            argv = [str(script)] if script.exists() else [py, "-m", "vllm_stateful.cli"]
            env = {**vllm_env, "VLLM_STATEFUL_BUDGET_FRACTION": str(o.budget_fraction)}
            return argv + ["serve", o.model_dir] + vllm_flags, env
        if self.key in ("vllm-nopc", "vllm-pc"):
            argv = [
                py,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                o.model_dir,
            ] + vllm_flags
            if self.key == "vllm-nopc":
                argv.append("--no-enable-prefix-caching")
            return argv, vllm_env
        if self.key == "llamacpp":
            assert o.gguf_path, "llama.cpp needs the GGUF export"
            return [
                py, "-m", "llama_cpp.server", "--model", o.gguf_path, *common,
                "--model_alias", SERVED_NAME, "--n_ctx", str(o.max_model_len),
                "--n_threads", str(o.threads), "--n_threads_batch", str(o.threads),
                "--cache", "true", "--logits_all", "false", "--interrupt_requests", "false",
            ], {}  # fmt: skip
        if self.key == "sglang":
            return [
                py, "-m", "sglang.launch_server", "--model-path", o.model_dir, *common,
                "--dtype", o.dtype, "--served-model-name", SERVED_NAME,
            ], {}  # fmt: skip
        if self.key == "trtllm":
            return [shutil.which("trtllm-serve") or "trtllm-serve", o.model_dir, *common], {}
        raise KeyError(self.key)


ENGINES: dict[str, EngineSpec] = {
    s.key: s
    for s in (
        EngineSpec(
            "stateful",
            "vllm-stateful",
            ("vllm-stateful", "vllm-stateful flash"),
            "stateful",
            "/health",
        ),
        EngineSpec(
            "vllm-nopc",
            "vLLM, prefix caching off",
            ("vLLM, prefix caching off",),
            "openai",
            "/health",
        ),
        EngineSpec(
            "vllm-pc", "vLLM, prefix caching on", ("vLLM, prefix caching on",), "openai", "/health"
        ),
        EngineSpec("llamacpp", "llama.cpp", ("llama.cpp",), "openai", "/v1/models"),
        EngineSpec("sglang", "SGLang", ("SGLang",), "openai", "/health"),
        EngineSpec("trtllm", "TensorRT-LLM", ("TensorRT-LLM",), "openai", "/health"),
    )
}


def has_cuda() -> bool:
    # No torch import here: the orchestrator stays light, and a CUDA host
    # always has the driver's tool.
    return shutil.which("nvidia-smi") is not None


def unavailable(key: str) -> str | None:
    """Why this engine cannot run on this machine, or None if it can."""
    if key == "llamacpp":
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (`make bench-market` builds it)"
        return None
    if key == "sglang":
        if not has_cuda():
            return "no CUDA device: SGLang's PyPI build (0.5.23) is GPU-only"
        if importlib.util.find_spec("sglang") is None:
            return "sglang is not installed (pip install sglang on this GPU host)"
        return None
    if key == "trtllm":
        if not has_cuda():
            return (
                "no CUDA device: TensorRT-LLM (1.2.1) is GPU-only, and its PyPI package "
                "fetches its real wheel from NVIDIA's index at install time"
            )
        if shutil.which("trtllm-serve") is None:
            return "tensorrt_llm is not installed (no trtllm-serve on PATH)"
        return None
    return None
