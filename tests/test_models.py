"""Tests for vllm_stateful.models: the tiny model folder and the SmolLM2 GGUF lookup.

These run on transformers alone (no vLLM engine), so they take a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_stateful import models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(models.tiny_model(str(tmp_path_factory.mktemp("m") / "tiny")))


def test_tiny_config(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == cfg["head_dim"] == 64
    assert (cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]) == (2, 256, 512)
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["dtype"] == "float32"


def test_tiny_weights_are_the_same_everywhere(tiny: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(tiny / "model.safetensors"))
    assert sd["model.embed_tokens.weight"][0, :2].tolist() == pytest.approx([0.0192973, 0.4088961], abs=1e-6)
    assert sd["lm_head.weight"][5, :2].tolist() == pytest.approx([0.5407566, -0.9478074], abs=1e-6)


def test_tiny_tokenizer_encodes_any_text(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    for text in ["09:30:01 1651.25 3\n", "The capital of France is", "héllo 🚀 中文"]:
        assert tok.decode(tok.encode(text)) == text
    chat = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_greedy_output_varies(tiny: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny)
    model = LlamaForCausalLM.from_pretrained(tiny).eval()
    ids = tok("09:30:01 1651.25 3\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :].tolist()
    assert len(set(out)) >= 16  # not stuck on one token or a short loop
    # The next token depends on more than the last token.
    with torch.no_grad():
        prompts = [tok(p + " x", return_tensors="pt").input_ids for p in ["a", "09:30", "The cat", "?"]]
        nexts = {model(p).logits[0, -1].argmax().item() for p in prompts}
    assert len(nexts) > 1


def test_tiny_is_reused(tiny: Path) -> None:
    weights = tiny / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert models.tiny_model(str(tiny)) == str(tiny)
    assert weights.stat().st_mtime_ns == before


def test_stale_folder_is_rebuilt_and_foreign_one_kept(tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / models._STAMP_FILE).write_text("tiny-llama v0\n")
    assert (Path(models.tiny_model(str(stale))) / "model.safetensors").is_file()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RuntimeError):
        models.tiny_model(str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_smollm2_gguf_is_shipped() -> None:
    assert models.smollm2_gguf().stat().st_size > 50_000_000
