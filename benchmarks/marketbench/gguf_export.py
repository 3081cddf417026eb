"""The same bf16 weights vLLM loads, written as a bf16 GGUF for llama.cpp.

llama.cpp's own converter is not shipped in the llama-cpp-python wheel, so
this writes the file with the ``gguf`` package:

* tensors come from the bf16 safetensors folder that vLLM serves, so both
  engines run identical weights at the same precision (1-D norm weights are
  stored as F32, as llama.cpp's converter does; bf16 to f32 is exact);
* q/k projection rows are permuted into llama.cpp's rotary layout (the
  inverse of what transformers undoes when it reads a GGUF);
* every metadata key (hyperparameters, tokenizer, chat template) is copied
  from the GGUF the folder was converted from, so llama.cpp tokenizes as the
  original file does.

``python benchmarks/marketbench/gguf_export.py MODEL_DIR SOURCE.gguf OUT.gguf``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

STAMP = "bf16-from-safetensors v1"

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's tensor name for a Llama tensor; None for the tied head."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}." + _LAYER_NAMES[".".join(parts[3:])]
    raise KeyError(f"no GGUF name for tensor {hf_name}")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotate-half layout) to llama.cpp's interleaved layout,
    as llama.cpp's ``convert_hf_to_gguf.py`` does for Llama."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def export(model_dir: str | Path, source_gguf: str | Path, out: str | Path) -> Path:
    import gguf
    import torch
    from safetensors.torch import load_file

    model_dir, out = Path(model_dir), Path(out)
    stamp = out.with_suffix(".stamp")
    if out.exists() and stamp.exists() and stamp.read_text() == STAMP:
        return out
    config = json.loads((model_dir / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    tied = config.get("tie_word_embeddings", False)

    reader = gguf.GGUFReader(str(source_gguf))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"{source_gguf} is a {arch!r} model; only llama is supported")
    writer = gguf.GGUFWriter(str(out) + ".tmp", arch)
    for key, field in reader.fields.items():
        # The writer sets these itself (header, architecture) or they
        # describe the source's quantization.
        if key.startswith("GGUF.") or key in (
            "general.architecture",
            "general.file_type",
            "general.quantization_version",
        ):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    tensors = load_file(str(model_dir / "model.safetensors"))
    for hf_name in sorted(tensors):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        t = tensors[hf_name].to(torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            t = permute_rows(t, n_head)
        elif hf_name.endswith("k_proj.weight"):
            t = permute_rows(t, n_kv)
        name = gguf_name(hf_name)
        if t.ndim == 1:
            writer.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
        else:
            # The values are bf16 already, so this rounding is exact.
            data = gguf.quants.quantize(np.ascontiguousarray(t), gguf.GGMLQuantizationType.BF16)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".tmp").replace(out)
    stamp.write_text(STAMP)
    return out


def check_against_source(out: str | Path, source_gguf: str | Path, names: list[str]) -> float:
    """Largest difference between tensors of ``out`` and the source GGUF's
    dequantized tensors (both in llama.cpp's layout)."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(source_gguf)).tensors}
    worst = 0.0
    for n in names:
        x = gguf.quants.dequantize(a[n].data, a[n].tensor_type).astype(np.float32)
        y = gguf.quants.dequantize(b[n].data, b[n].tensor_type).astype(np.float32)
        # The source's Q4_1/Q8_0 values were rounded to bf16 on the way.
        y = gguf.quants.dequantize(
            gguf.quants.quantize(y, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
        )
        worst = max(worst, float(np.abs(x.reshape(y.shape) - y).max()))
    return worst


if __name__ == "__main__":
    print(export(*sys.argv[1:4]))
