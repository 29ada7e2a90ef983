"""``POST /v1/chat/completions``: request and response models, written by hand.

Unknown fields are rejected (``extra="forbid"``): a parameter the gateway would not honour must not
be silently dropped while the answer is signed (reference weakness §17.9). Which of the accepted
parameters a given provider can honour is the provider adapter's call (``Provider.unsupported``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Strict = ConfigDict(extra="forbid", strict=True)


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: StrictStr


class ImageURL(BaseModel):
    model_config = Strict
    url: StrictStr = Field(description="https URL or data: URI")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    model_config = Strict
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    model_config = Strict
    name: StrictStr
    arguments: StrictStr


class ToolCall(BaseModel):
    model_config = Strict
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(BaseModel):
    model_config = Strict
    role: Literal["system"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class DeveloperMessage(BaseModel):
    model_config = Strict
    role: Literal["developer"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None


class UserMessage(BaseModel):
    model_config = Strict
    role: Literal["user"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None


class AssistantMessage(BaseModel):
    model_config = Strict
    role: Literal["assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: StrictStr | None = None


class ToolMessage(BaseModel):
    model_config = Strict
    role: Literal["tool"]
    content: StrictStr | list[TextPart]
    tool_call_id: StrictStr


class FunctionMessage(BaseModel):
    model_config = Strict
    role: Literal["function"]
    content: StrictStr | None
    name: StrictStr


Message = Annotated[
    SystemMessage
    | DeveloperMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage,
    Field(discriminator="role"),
]


class FunctionDef(BaseModel):
    model_config = Strict
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = Strict
    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = Strict
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(BaseModel):
    model_config = Strict
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormatText(BaseModel):
    model_config = Strict
    type: Literal["text"]


class ResponseFormatJSONObject(BaseModel):
    model_config = Strict
    type: Literal["json_object"]


class ResponseFormatJSONSchema(BaseModel):
    model_config = Strict
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJSONObject | ResponseFormatJSONSchema,
    Field(discriminator="type"),
]


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: StrictBool | None = None


Number = StrictInt | float


class SamplingRequest(BaseModel):
    """What chat and legacy completions requests share."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    model: StrictStr = Field(min_length=1, max_length=256)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    user: StrictStr | None = Field(None, max_length=256)
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None
    frequency_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[Number, Field(ge=-2, le=2)] | None = None


class ChatCompletionRequest(SamplingRequest):
    """The subset of OpenAI's chat request that the gateway relays and signs."""

    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None


# ---------------------------------------------------------------------------------------------
# responses (documented in OpenAPI; the relay renders them directly for speed)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int] | None = None
    completion_tokens_details: dict[str, int] | None = None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter"]


class TeeFields(BaseModel):
    tee_signature: str = Field(description="base64 RSA-PSS(SHA-256, MGF1-SHA-256, salt 32)")
    tee_request_hash: str = Field(description="keccak256 of the canonical request, 64 hex")
    tee_output_hash: str = Field(description="keccak256 of the output content, 64 hex")
    tee_timestamp: int = Field(description="unix seconds, part of the signed message")
    tee_id: str = Field(description="0x + keccak256(DER public key)")


class ChatCompletion(TeeFields):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None
