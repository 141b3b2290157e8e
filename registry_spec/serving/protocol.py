"""The OpenAI API's request and response shapes that `zoo serve` speaks (completions, chat completions, models,
errors; vLLM's tokenize and detokenize), as pydantic models: unknown fields and out-of-range values are 400s naming
the field."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class APIError(Exception):
    """An error answered in OpenAI's schema."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: Literal[1] = Field(1, description="one choice per prompt")
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions, as vLLM and llama-server take them
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop sequences")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported")
        return None

    def completion_limit(self) -> tuple[str, int | None]:
        """The field capping the completion, and its value (None: up to the context)."""
        return "max_tokens", self.max_tokens


class CompletionRequest(_Request):
    # checked by _prompts, whose one message names every accepted form (a union's errors name one member each)
    prompt: Any = Field(description="a text, a list of texts, token ids, or a list of token-id lists (OpenAI's forms)")
    suffix: str | None = Field(None, description="fill-in-the-middle: the text after the completion")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=1, description="the chosen token's log-probability (top-1 only)")
    echo: Literal[False] = False
    best_of: Literal[1] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: Any) -> list[str | list[int]]:
        """A list of prompts, each a text or its token ids."""
        def ids(x: Any) -> bool:
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str) or (ids(v) and v):
            return [v]
        if isinstance(v, list) and v and (all(isinstance(x, str) for x in v) or all(ids(x) for x in v)):
            return v
        raise ValueError("a prompt is a text, a list of texts, a list of token ids or a list of token-id lists"
                         + (" (and not empty)" if v in ([], "") else ""))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Literal[0] | None = None

    def completion_limit(self) -> tuple[str, int | None]:
        """The field capping the completion, and its value: OpenAI's newer name wins over the deprecated one."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().completion_limit()


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages as the chat route renders them."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids back to text (special tokens kept)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    tokens: list[int]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"  # eos and stop strings are both "stop" in the API


def envelope(kind: str, model: str, choices: list[dict[str, Any]], rid: str, **extra: Any) -> dict[str, Any]:
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices, **extra}


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
