"""``overflow="slide"`` over HTTP with the real client: a session past its
``max_tokens`` keeps its prefix and its newest appends, its stats say so,
and a bad overflow value is a 400."""

from __future__ import annotations

import pytest

from vllm_stateful.client import AppendTooLargeError, Client, InvalidInputError

from .conftest import Server


def test_slide_session_over_http(server: Server):
    with Client(server.base_url, api_key=server.api_key) as client:
        with pytest.raises(InvalidInputError, match="overflow must be one of reject, slide") as err:
            client.create_session([1, 2, 3], overflow="fifo")
        assert err.value.http_status == 400

        s = client.create_session([1] * 20, session_id="http-slide", overflow="slide", max_tokens=100)
        try:
            stats = s.stats()
            assert (stats.overflow, stats.max_tokens, stats.slides) == ("slide", 100, 0)
            # 20 + 30 + 30 = 80 <= 100; + 40 = 120 > 100: a slide. Newest
            # first within 75 (3/4 of 100): 20 + 40 = 60, + 30 = 90 > 75, so
            # the window is the prefix and the last append (version 3).
            assert s.append([2] * 30) == 1
            assert s.append([3] * 30) == 2
            assert s.append([4] * 40, wait=True) == 3
            stats = s.stats()
            assert (stats.version, stats.ingested_version, stats.tokens) == (3, 3, 60)
            assert (stats.window_start_version, stats.dropped_tokens, stats.slides) == (3, 60, 1)
            assert stats.sliding is False
            answer = s.query([5, 6], max_tokens=2, temperature=0, ignore_eos=True)
            assert answer.session.version == 3
            assert answer.usage.prompt_tokens == 60 + 2
            with pytest.raises(AppendTooLargeError, match="limit of 100 tokens") as err:
                s.append([7] * 81)  # 20 + 81 > 100: no window can hold it
            assert err.value.http_status == 400
            assert s.stats().version == 3
        finally:
            s.close()
