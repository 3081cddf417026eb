"""Small helpers shared by the tests."""

from __future__ import annotations

import uuid

from vllm import SamplingParams
from vllm.inputs import TokensPrompt


def greedy(max_tokens: int = 8) -> SamplingParams:
    # ignore_eos: both sides always produce max_tokens, so whole sequences
    # are compared, not just their common prefix.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def generate(llm, prompt_ids: list[int], params: SamplingParams):
    """One request on a plain AsyncLLM; returns the final RequestOutput."""
    final = None
    async for out in llm.generate(
        TokensPrompt(prompt_token_ids=prompt_ids), params.clone(), f"ref-{uuid.uuid4().hex}"
    ):
        final = out
    return final


async def reference(llm, prompt_ids: list[int], max_tokens: int = 8) -> list[int]:
    out = await generate(llm, prompt_ids, greedy(max_tokens))
    return list(out.outputs[0].token_ids)
