"""API side of vllm-stateful: sessions, ingestion, questions and flash
queries over vLLM's ``AsyncLLM``. ``StatefulEngine`` is the facade."""

from vllm_stateful.engine.args import stateful_engine_args
from vllm_stateful.engine.facade import StatefulEngine
from vllm_stateful.engine.result import EngineKVStats, QueryResult

__all__ = ["EngineKVStats", "QueryResult", "StatefulEngine", "stateful_engine_args"]
