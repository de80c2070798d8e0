"""A request's text conditioning: what T5 reads (the styled, cleaned prompt and negative prompt), the length it is
encoded at (a bucket above the longest text), and encoding through the cache of T5 outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache

import numpy as np

from engine.text import T5Tokenizer, apply_style, preprocess
from engine.text_cache import KeyedEmbeddingCache

log = logging.getLogger(__name__)

# A request's text is encoded and cross-attended only up to its longest text (prompt or negative prompt) rounded up
# to this many tokens. Padding is masked out (T5: -inf bias, transformer: -10000 bias, both exp() to 0), so
# trimming changes nothing but the work; a batch pads its rows to the longest member's length, masked the same way.
TEXT_BUCKET = 32


@lru_cache(maxsize=1024)
def prompt_texts(style: str, prompt: str, negative: str, clean: bool, guided: bool) -> tuple[str, ...]:
    """What T5 reads: the styled, cleaned prompt, then (when guided) the negative prompt."""
    prompt, negative = apply_style(style, prompt, negative)
    if guided:
        return preprocess(prompt, clean), preprocess(negative, clean)
    return (preprocess(prompt, clean),)


def text_length(tokens: int, max_length: int, trim: bool) -> int:
    """The length texts of `tokens` tokens are encoded at: their bucket, or `max_length` when not trimming."""
    if not trim:
        return max_length
    return min(max_length, -(-tokens // TEXT_BUCKET) * TEXT_BUCKET)


def encode_texts(
    texts: list[str],
    tokenizer: T5Tokenizer,
    cache: KeyedEmbeddingCache,
    run_encoder: Callable[[dict[str, np.ndarray]], np.ndarray],
    *,
    max_length: int,
    trim: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 last hidden states (B, L, C) and the int64 mask for preprocessed texts, L = the texts' length bucket.

    Texts already in the cache are not encoded again (the default empty negative prompt, repeated prompts); the
    others go through `run_encoder` in one batch.
    """
    ids, mask, truncated = tokenizer.encode(texts, max_length=max_length)
    length = text_length(int(mask.sum(1).max()), max_length, trim)
    ids, mask = ids[:, :length], mask[:, :length]
    found = {t: v for t in texts if (v := cache.get((t, length))) is not None}
    todo = {t: n for n, t in enumerate(texts) if t not in found}
    if todo:
        rows = list(todo.values())
        for n in rows:
            if truncated[n]:
                log.warning("prompt longer than %d tokens was truncated: %.80r", max_length, texts[n])
        fresh = run_encoder({"input_ids": ids[rows], "attention_mask": mask[rows]})
        for t, row in zip(todo, fresh, strict=True):
            found[t] = row
            cache.put((t, length), row)
    embeds = np.stack([found[t] for t in texts])
    return embeds, mask
