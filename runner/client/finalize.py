"""Work done once a request has ended, off the hot path: token counts and ITL samples."""

from __future__ import annotations

from typing import Callable, Optional

from runner.client.record import RequestRecord

TokenCounter = Callable[[str], int]


def finalize(record: RequestRecord, count_tokens: Optional[TokenCounter]) -> list[float]:
    """Complete the token counts of an ended request and return its ITL samples in seconds.

    Without server usage, `completion_tokens` becomes the counter's count of the whole generated
    text with `token_source="tokenizer"`; without a counter it stays None. The record's
    `empty_output` flag is set, then `chunk_texts` is dropped to free memory, so the ITL samples
    are computed here first, kept in `record.itl` and returned.

    A record that is already final (its `itl` is set, for example by the worker process that
    sent it) is returned as it is: a second call neither counts again nor changes a flag.
    """
    if record.itl is not None:
        return record.itl
    texts = record.chunk_texts
    if not record.token_source and count_tokens is not None:
        record.completion_tokens = count_tokens("".join(texts))
        record.token_source = "tokenizer"
    elif record.token_source == "usage" and count_tokens is not None and record.success:
        # Both counts exist: keep the client's, so a server whose usage disagrees shows up.
        record.tokenizer_tokens = count_tokens("".join(texts))
    # A successful response that generated nothing keeps success=True (the server did what it
    # was asked), and its TTFT stays None because no chunk carried text.
    record.empty_output = record.success and (record.completion_tokens == 0 or not texts)
    samples = itl_samples(record, count_tokens)
    record.chunk_texts = []
    record.itl = samples
    return samples


def itl_samples(record: RequestRecord, count_tokens: Optional[TokenCounter]) -> list[float]:
    """Return the inter-token latencies of a record, in seconds, one per token after the first chunk.

    Each gap between two consecutive token-bearing chunks is shared equally by the k tokens of
    the later chunk, giving k samples of gap / k. k is 1 for every chunk when
    `completion_tokens` equals the number of chunks, when it is unknown, or when there is no
    counter. Otherwise k is the counter's count of the chunk's text, at least 1. The per-chunk
    counts may not add up to `completion_tokens`, because a tokenizer can split a text cut
    into pieces differently from the whole. Needs `chunk_texts`, so call it before `finalize`
    drops them (finalize itself returns these samples).
    """
    times = record.chunk_times
    if len(times) < 2:
        return []
    tokens = record.completion_tokens
    one_token_per_chunk = count_tokens is None or tokens is None or tokens == len(times)
    samples: list[float] = []
    for index in range(1, len(times)):
        gap = times[index] - times[index - 1]
        if one_token_per_chunk:
            samples.append(gap)
            continue
        share = max(1, count_tokens(record.chunk_texts[index]))
        samples.extend([gap / share] * share)
    return samples
