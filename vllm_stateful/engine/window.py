"""The context-overflow policy of a session, and the window a slide keeps.

A session's token log is its prefix (version 0's tokens) followed by its
appends. It may hold at most ``limit`` tokens: the session's ``max_tokens``,
or else the model's ``max_model_len`` minus the one position a request needs
to generate a token (what admission has always refused past). What happens
when an append would pass it is the session's ``overflow`` policy:

- ``reject`` (the default): the append is refused (``ContextLengthError``).
- ``slide``: the oldest appends are dropped. The new window is the prefix
  plus the newest *whole* appends that fit in ``window_target(limit)``
  (always at least the append that overflowed).

Pure functions: the slide itself (building the window's KV, the swap) is
``engine/slide.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_stateful.errors import AppendTooLargeError, InvalidInputError

OVERFLOW_POLICIES = ("reject", "slide")

# A slide keeps at most 3/4 of the limit, so the next quarter of appends go
# straight into the window: without this slack every append past the limit
# would slide again (each slide re-ingests the whole window).
WINDOW_FRACTION_NUM, WINDOW_FRACTION_DEN = 3, 4


def check_policy(overflow: object) -> str:
    if overflow not in OVERFLOW_POLICIES:
        raise InvalidInputError(
            f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}; got {overflow!r}"
        )
    return overflow  # type: ignore[return-value]


def model_limit(max_model_len: int) -> int:
    """The most tokens a session may hold by default: one position is left
    for the token a request generates."""
    return max_model_len - 1


def check_max_tokens(max_tokens: object, prefix_tokens: int, max_model_len: int) -> int | None:
    """A session's own token limit, checked: at most the model's, and room
    for the prefix plus at least one appended token."""
    if max_tokens is None:
        return None
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidInputError(f"max_tokens must be an integer; got {max_tokens!r}")
    allowed = model_limit(max_model_len)
    if max_tokens > allowed:
        raise InvalidInputError(
            f"max_tokens {max_tokens} is larger than the model allows: a session holds at "
            f"most {allowed} tokens (max_model_len {max_model_len}, one position left to "
            f"generate)"
        )
    if max_tokens <= prefix_tokens:
        raise InvalidInputError(
            f"max_tokens {max_tokens} leaves no room for an append: the prefix alone is "
            f"{prefix_tokens} tokens (max_tokens must be at least prefix + one append, "
            f"{prefix_tokens + 1})"
        )
    return max_tokens


def window_target(limit: int) -> int:
    return limit * WINDOW_FRACTION_NUM // WINDOW_FRACTION_DEN


@dataclass(frozen=True)
class WindowPlan:
    """A window: the prefix and the appends from ``first_version`` on."""

    first_version: int  # the oldest version kept (its append is the first kept)
    tokens: list[int]  # prefix + the kept appends
    lengths: list[int]  # lengths[i]: the tokens of version first_version + i
    dropped_tokens: int  # the tokens of the appends this slide drops
    dropped_appends: int


def appends_of(prefix_len: int, lengths: list[int], first_version: int) -> list[tuple[int, int, int]]:
    """(version, start, end) of every append in a log whose version
    ``first_version + i`` is ``tokens[:lengths[i]]``, oldest first."""
    if first_version == 0:
        bounds, versions = lengths, range(1, len(lengths))
        starts = bounds[:-1]
        ends = bounds[1:]
    else:
        starts = [prefix_len, *lengths[:-1]]
        ends = lengths
        versions = range(first_version, first_version + len(lengths))
    return [(v, s, e) for v, s, e in zip(versions, starts, ends)]


def plan_window(
    prefix_len: int, tokens: list[int], lengths: list[int], first_version: int, limit: int
) -> WindowPlan:
    """The window of a log that passes ``limit`` (its newest version is the
    append that overflowed). Raises ``AppendTooLargeError`` when even the
    prefix and that append alone pass the limit."""
    appends = appends_of(prefix_len, lengths, first_version)
    assert appends, "a log with no append cannot overflow (the prefix fits the limit)"
    newest_version, newest_start, newest_end = appends[-1]
    if prefix_len + newest_end - newest_start > limit:
        raise AppendTooLargeError(
            f"an append of {newest_end - newest_start} tokens can never fit the session's "
            f"window: with the {prefix_len}-token prefix it passes the session's limit of "
            f"{limit} tokens (max_tokens, or the model's max_model_len - 1)"
        )
    target = window_target(limit)
    kept = 1
    size = prefix_len + newest_end - newest_start
    for _, start, end in reversed(appends[:-1]):
        if size + end - start > target:
            break
        size += end - start
        kept += 1
    window = appends[-kept:]
    out = list(tokens[:prefix_len])
    window_lengths = []
    for _, start, end in window:
        out.extend(tokens[start:end])
        window_lengths.append(len(out))
    dropped = appends[:-kept]
    return WindowPlan(
        first_version=window[0][0],
        tokens=out,
        lengths=window_lengths,
        dropped_tokens=sum(end - start for _, start, end in dropped),
        dropped_appends=len(dropped),
    )
