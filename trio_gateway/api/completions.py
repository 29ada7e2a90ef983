"""``POST /v1/completions`` (legacy text completions): request and response models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictStr

from .chat import SamplingRequest, TeeFields, Usage


class CompletionRequest(SamplingRequest):
    prompt: StrictStr = Field(description="a single prompt string")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: None = None


class Completion(TeeFields):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
