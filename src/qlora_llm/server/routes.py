"""Routes: the seed's /generate and /health, OpenAI's /v1/*, and /metrics. Thin: check, submit, answer.

Every generation goes through the batching engine as a `Job`; the route waits on the job's event
queue. A client that goes away (a closed stream, or a dropped connection while waiting) sets the
job's cancel flag, which the engine checks before every token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from qlora_llm.generate import SamplingParams
from qlora_llm.server.engine import Job, QueueFull
from qlora_llm.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
)

PATHS = {
    "/health",
    "/generate",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/metrics",
    "/openapi.json",
}


def _fail(status: int, message: str, param: str | None = None, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, {"message": message, "param": param}, headers=headers)


# Documented in the OpenAPI schema, so clients and schema-driven tools (schemathesis in our tests) know
# every answer a route can give: its errors and, with "stream": true, server-sent events.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "malformed JSON body"),
        (401, "missing or wrong API key"),
        (404, "the requested model is not served here"),
        (413, "body larger than serve.max_body_bytes"),
        (422, "a field is missing, of the wrong type or out of range; the message names it"),
        (429, "the queue is full (serve.max_queue); retry later"),
        (503, "the model is still loading or failed to load"),
    ]
}
# Before OpenAPI 3.2 (FastAPI writes 3.1) an event stream's schema describes each event.
STREAMED = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "data": {"type": "string", "description": "a JSON object; OpenAI's end with [DONE]"}
            },
            "required": ["data"],
        }
    }
}

# The API key is checked by the app's RequireKey middleware for every path but these, before routing:
# a route added later cannot slip past it, and no body is parsed for a client without the key.
PUBLIC_PATHS = {"/health"}
public = APIRouter()
protected = APIRouter(responses=ERRORS)


@public.get("/health", responses={503: {"description": "the model is loading, or failed to load"}})
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    body: dict[str, Any] = {"status": "ok", "gpu": None, "model": state.primary, "models": list(state.served)}
    body["uptime_s"] = round(time.time() - state.started, 1)
    if state.load_error is not None:
        return JSONResponse(body | {"status": "error", "error": state.load_error}, 503)
    if state.engine is None:
        return JSONResponse(body | {"status": "loading"}, 503, headers={"Retry-After": "5"})
    device = state.engine.loaded.device
    if device == "cuda":
        import torch

        body["gpu"] = torch.cuda.get_device_name(0)
    body |= {"device": device, "in_flight": state.engine.in_flight}
    return JSONResponse(body)


# --------------------------------------------------------------------------------------------------
# Shared steps


def _engine(request: Request) -> Any:
    state = request.app.state
    if state.engine is None:
        raise _fail(503, "the model is still loading; retry shortly", headers={"Retry-After": "5"})
    return state.engine


def _adapter(request: Request, model: str | None) -> tuple[str, str | None]:
    served = request.app.state.served
    name = model or request.app.state.primary
    if name not in served:
        raise _fail(404, f"model '{name}' is not served here; available: {', '.join(served)}", "model")
    return name, served[name]


def _params(
    request: Request,
    prompt_ids: list[int],
    max_new_tokens: int,
    field: str,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
) -> SamplingParams:
    serve = request.app.state.cfg.serve
    limit = serve.max_new_tokens_limit
    if not 1 <= max_new_tokens <= limit:
        raise _fail(422, f"{field}: must be between 1 and {limit}, got {max_new_tokens}", field)
    context = request.app.state.engine.loaded.context_length
    if len(prompt_ids) + max_new_tokens > context:
        raise _fail(
            422,
            f"{field}: the prompt has {len(prompt_ids)} tokens and {field} is {max_new_tokens}: "
            f"{len(prompt_ids) + max_new_tokens} is more than the model's context of {context} tokens",
            field,
        )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=serve.temperature if temperature is None else temperature,
        top_p=serve.top_p if top_p is None else top_p,
        seed=seed,
    )


def _submit(request: Request, prompt_ids: list[int], params: SamplingParams, adapter: str | None) -> Job:
    job = Job(prompt_ids, params, adapter, asyncio.get_running_loop(), asyncio.Queue())
    try:
        _engine(request).submit(job)
    except QueueFull as err:
        raise _fail(429, f"server busy: {err}; retry after a second", headers={"Retry-After": "1"}) from None
    return job


async def _result(request: Request, job: Job) -> dict[str, Any]:
    """Wait for the job; if the client disconnects meanwhile, cancel it at the next token.

    The disconnect check runs every 0.25 s whether or not deltas arrive (a busy job sends one per token).
    """
    checked = time.monotonic()
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.25)
        except TimeoutError:
            kind, value = "wait", None
        if kind == "done":
            return value
        if kind == "error":
            raise _fail(500, value)
        if time.monotonic() - checked >= 0.25:
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel.set()
                raise _fail(499, "client closed the request")


async def _events(job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's deltas then its result; leaving early (client gone) cancels the generation."""
    done = False
    try:
        while True:
            kind, value = await job.events.get()
            done = kind in ("done", "error")
            yield kind, value
            if done:
                return
    finally:
        if not done:
            job.cancel.set()


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --------------------------------------------------------------------------------------------------
# The seed's contract


@protected.post(
    "/generate", response_model=None, responses={200: {"model": GenerateResponse, "content": STREAMED}}
)
async def generate(body: GenerateRequest, request: Request) -> dict[str, str] | StreamingResponse:
    engine = _engine(request)
    _, adapter = _adapter(request, body.model)
    ids = request.app.state.generator.encode(body.prompt)
    wanted = (
        request.app.state.cfg.serve.max_new_tokens if body.max_new_tokens is None else body.max_new_tokens
    )
    params = _params(request, ids, wanted, "max_new_tokens", body.temperature, body.top_p, body.seed)
    job = _submit(request, ids, params, adapter)
    del engine
    if not body.stream:
        return {"response": (await _result(request, job))["text"]}

    async def stream() -> AsyncIterator[str]:
        async for kind, value in _events(job):
            if kind == "delta":
                yield _sse({"token": value})
            elif kind == "done":
                yield _sse({"response": value["text"], "finish_reason": value["finish_reason"], "done": True})
            else:
                yield _sse({"error": value})

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible


def _usage(result: dict[str, Any]) -> dict[str, int]:
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


@protected.post("/v1/chat/completions", response_model=None, responses={200: {"content": STREAMED}})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    _engine(request)
    name, adapter = _adapter(request, body.model)
    messages = [m.model_dump() for m in body.messages]
    ids = request.app.state.generator.encode(messages)
    field, wanted = "max_tokens", request.app.state.cfg.serve.max_new_tokens
    if body.max_completion_tokens is not None:
        field, wanted = "max_completion_tokens", body.max_completion_tokens
    elif body.max_tokens is not None:
        wanted = body.max_tokens
    params = _params(request, ids, wanted, field, body.temperature, body.top_p, body.seed)
    job = _submit(request, ids, params, adapter)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not body.stream:
        result = await _result(request, job)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result["text"]},
                    "finish_reason": result["finish_reason"],
                }
            ],
            "usage": _usage(result),
        }

    def chunk(delta: dict, finish: str | None = None) -> str:
        return _sse(
            {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )

    async def stream() -> AsyncIterator[str]:
        yield chunk({"role": "assistant", "content": ""})
        async for kind, value in _events(job):
            if kind == "delta":
                yield chunk({"content": value})
            elif kind == "done":
                yield chunk({}, value["finish_reason"])
            else:
                yield _sse({"error": {"message": value, "type": "server_error"}})
        yield _sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@protected.post("/v1/completions", response_model=None, responses={200: {"content": STREAMED}})
async def completions(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    _engine(request)
    name, adapter = _adapter(request, body.model)
    # A completion continues raw text: no chat template, as OpenAI's /v1/completions does.
    ids = request.app.state.generator.tokenizer(body.prompt, add_special_tokens=True)["input_ids"]
    params = _params(request, ids, body.max_tokens, "max_tokens", body.temperature, body.top_p, body.seed)
    job = _submit(request, ids, params, adapter)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def body_of(text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        }

    if not body.stream:
        result = await _result(request, job)
        return body_of(result["text"], result["finish_reason"]) | {"usage": _usage(result)}

    async def stream() -> AsyncIterator[str]:
        async for kind, value in _events(job):
            if kind == "delta":
                yield _sse(body_of(value, None))
            elif kind == "done":
                yield _sse(body_of("", value["finish_reason"]))
            else:
                yield _sse({"error": {"message": value, "type": "server_error"}})
        yield _sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)


@protected.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    created = int(request.app.state.started)
    return {
        "object": "list",
        "data": [
            {"id": n, "object": "model", "created": created, "owned_by": "qlora-llm"}
            for n in request.app.state.served
        ],
    }


# Not response_class=PlainTextResponse: that would document the JSON errors as text too.
@protected.get("/metrics", responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    state = request.app.state
    state.metrics.in_flight.set(state.engine.in_flight if state.engine is not None else 0)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# FastAPI's own /openapi.json would be public; the schema describes every route, so it takes the key too.
@protected.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())
