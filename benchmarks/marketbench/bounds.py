"""How flat end-to-end latency can be on a CPU, from the model's shapes.

Decoding one token reads every weight once and the whole KV cache of the
context once. On a memory-bound CPU the time of a decoded token therefore
grows as ``weights + context * kv_bytes_per_token``; no engine can make an
answer of ``n`` decoded tokens flat in the context. The ratio of those byte
counts between two contexts is the bound the measured ratio is set against.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class DecodeTraffic:
    weight_bytes: int
    kv_bytes_per_token: int

    def bytes_per_token(self, context: int) -> int:
        return self.weight_bytes + context * self.kv_bytes_per_token

    def ratio(self, long: int, short: int) -> float:
        """Bytes read per decoded token at ``long`` over ``short`` context."""
        return self.bytes_per_token(long) / self.bytes_per_token(short)


def decode_traffic(model_dir: str | Path, kv_dtype: str) -> DecodeTraffic:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    # K and V, per layer, per KV head.
    kv = (
        2
        * cfg["num_hidden_layers"]
        * cfg["num_key_value_heads"]
        * head_dim
        * _DTYPE_BYTES[kv_dtype]
    )
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    return DecodeTraffic(weight_bytes=weights, kv_bytes_per_token=kv)
