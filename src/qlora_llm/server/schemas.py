"""Request and response bodies of the server: the seed's /generate contract and OpenAI's.

Type and range checks that do not depend on the loaded model live here (pydantic); the ones that do
(the server's max_new_tokens limit, prompt + answer within the context) are checked by the routes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator


class _Body(BaseModel):
    # Strict: the schema says boolean and number, so 0 is not false and true is not 1.0.
    model_config = ConfigDict(extra="ignore", strict=True)


# Said in the schema too, so clients and schema-driven tools know it. ASCII whitespace only: Python's
# str.isspace and the Unicode White_Space set that JSON Schema validators use differ beyond it.
_BLANK = " \t\n\r\f\v"
_NOT_BLANK = Field(json_schema_extra={"pattern": "[^ \\t\\n\\r\\f\\v]"})


def _not_blank(value: str) -> str:
    if not value.strip(_BLANK):
        raise ValueError("must not be empty")
    return value


class GenerateRequest(_Body):
    """The seed's POST /generate body; `stream` and `model` are additions.

    Unset numbers take the server's defaults (serve.max_new_tokens 512, serve.temperature 0.7: the seed's).
    """

    prompt: str = _NOT_BLANK
    max_new_tokens: StrictInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = None
    stream: bool = False
    model: str | None = None

    _prompt = field_validator("prompt")(_not_blank)


class GenerateResponse(BaseModel):
    response: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """Every error the server sends: OpenAI's shape, so its client raises the right exception."""

    error: ErrorDetail


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = None
    stream: bool = False
    n: Literal[1] = 1

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        if not messages[-1].content.strip(_BLANK):
            raise ValueError("the last user message must not be empty")
        return messages


class CompletionRequest(_Body):
    model: str | None = None
    prompt: str = _NOT_BLANK
    max_tokens: StrictInt = 16  # OpenAI's default for /v1/completions
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: StrictInt | None = None
    stream: bool = False
    n: Literal[1] = 1

    _prompt = field_validator("prompt")(_not_blank)
