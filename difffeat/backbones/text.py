"""Text sequences of LLM-encoded families: where the prompt's tokens sit when a pipeline wraps it in a chat
template before encoding."""

from __future__ import annotations

from typing import Any

__all__ = ["chat_template_segment"]

_SLOT = "\x00PROMPT\x00"


def chat_template_segment(tokenizer: Any, max_length: int, drop: int = 0, **template_kwargs: Any):
    """A :class:`~difffeat.segment.prompts.TextSegment` whose template is the tokenizer's chat template around
    one user message, as the FLUX.2 [klein] / Z-Image pipelines apply it (``add_generation_prompt=True``)."""
    from .base import TextSegment

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    prefix, _, suffix = text.partition(_SLOT)
    return TextSegment(tokenizer, 0, max_length, template=prefix + "{}" + suffix, drop=drop)


