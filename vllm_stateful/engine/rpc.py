"""Requests and controls sent to vLLM on behalf of sessions.

Every session operation is an ordinary vLLM request: the session's tokens
(plus the new part), salted with the session's key so sessions never share
KV, and tagged in ``SamplingParams.extra_args`` (``protocol.py``) so the
engine-side connector knows the session and the operation.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Any, AsyncIterator

from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind
from vllm.exceptions import VLLMValidationError
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from vllm_stateful.config import scheduler_cls
from vllm_stateful.errors import EngineDeadError, InvalidInputError
from vllm_stateful.protocol import EngineReport, Op, RequestTag


def own_params(params: SamplingParams | None) -> SamplingParams:
    """A private copy of a caller's sampling parameters (default: greedy,
    16 tokens); the engine sets output kind and tags on it."""
    if params is None:
        return SamplingParams(temperature=0.0, max_tokens=16)
    if not isinstance(params, SamplingParams):
        raise InvalidInputError("sampling_params must be a vllm.SamplingParams")
    return params.clone()


def one_token() -> SamplingParams:
    """Parameters of ingest and control requests: their prompt is the work,
    the one sampled token is discarded."""
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


class EngineRPC:
    """Tags, salts and sends session requests to an ``AsyncLLM``."""

    def __init__(self, engine: Any):
        self.engine = engine
        tokenizer = engine.get_tokenizer()
        # One token for control requests (close / probe); its block is never
        # full, so it is never cached.
        bos = getattr(tokenizer, "bos_token_id", None)
        self._control_prompt = [bos if bos is not None else 0]
        # Whether the engine runs the session-aware scheduler, which orders
        # questions, ingestion and flash work itself.
        configured = engine.vllm_config.scheduler_config.scheduler_cls
        if isinstance(configured, type):
            configured = f"{configured.__module__}.{configured.__qualname__}"
        self.engine_orders = configured == scheduler_cls()

    @property
    def alive(self) -> bool:
        """False once vLLM's engine core has died (it never comes back)."""
        return not self.engine.errored

    def check_alive(self) -> None:
        """Fail fast, with a typed error, when the engine core is gone."""
        if self.engine.errored:
            raise EngineDeadError(
                "the vLLM engine core has died; sessions cannot be served (restart the server)"
            )

    def check_params(self, params: SamplingParams) -> None:
        """vLLM's own checks of sampling parameters against this engine (as
        at submission), for parameters kept to be used later (flash)."""
        vcfg = self.engine.vllm_config
        try:
            params.verify(
                vcfg.model_config, vcfg.speculative_config, vcfg.structured_outputs_config,
                self.engine.get_tokenizer(),
            )  # fmt: skip
        except VLLMValidationError as exc:
            raise InvalidInputError(str(exc)) from exc

    async def generate(
        self, key: str, prompt_ids: list[int], params: SamplingParams, op: Op,
        since: float | None = None, data_tokens: int | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.check_alive()
        tag = RequestTag(key, op, since, data_tokens)
        params.extra_args = {**(params.extra_args or {}), **tag.to_extra_args()}
        prompt = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=key)
        request_id = f"stateful-{op.value}-{uuid.uuid4().hex}"
        # aclosing: closing this generator closes vLLM's, which aborts the
        # request in the engine.
        async with contextlib.aclosing(self.engine.generate(prompt, params, request_id)) as outs:
            try:
                async for out in outs:
                    yield out
            except VllmEngineDeadError as exc:
                self.check_alive()
                raise EngineDeadError(str(exc)) from exc
            except VLLMValidationError as exc:
                # Parameters this engine cannot serve (e.g. min_p with
                # speculative decoding on): the caller's error, not ours.
                raise InvalidInputError(str(exc)) from exc

    async def final(
        self, key: str, prompt_ids: list[int], params: SamplingParams, op: Op,
        since: float | None = None,
    ) -> RequestOutput:
        final = None
        async for out in self.generate(key, prompt_ids, params, op, since):
            final = out
        assert final is not None and final.finished
        return final

    async def control(self, key: str, op: Op) -> EngineReport:
        final = await self.final(key, list(self._control_prompt), one_token(), op)
        report = EngineReport.from_params(final.kv_transfer_params)
        assert report is not None, "the session connector did not answer"
        return report

    def unfinished(self) -> int:
        """Requests of this API process in flight, stateless traffic included."""
        return self.engine.output_processor.get_num_unfinished_requests()
