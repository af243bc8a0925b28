"""The REST server: `create_app(cfg, target)` builds it, `serve(cfg, target)` runs it with uvicorn.

The model is loaded once, in a thread started by the lifespan, so the server answers at once:
`/health` says 503 "loading" until the model is ready. Everything a request needs lives on
`app.state`; there are no module globals. Guards sit in front of the routes: a body-size limit that
answers 413 before any parsing, an optional API key (constant-time compare) on every route but
/health, CORS only when origins are configured, and JSON errors that name the field and never carry a
stack trace or a server path.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import signal
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlora_llm.config import Config
from qlora_llm.generate import Generator
from qlora_llm.server.engine import Engine
from qlora_llm.server.metrics import Metrics

log = logging.getLogger(__name__)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, so its client raises the right exception with our message."""
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# An absolute path not inside a URL or a relative path: "/srv/models/x" but not "https://h/x" or "runs/x".
_SERVER_PATH = re.compile(r"(?<![\w:/.~])(?:/[^\s/'\"`,;()]+)+/?")


def public_message(err: Exception) -> str:
    """An error's message fit for a public body: every server path cut to its last part (the log has all)."""
    return _SERVER_PATH.sub(lambda m: Path(m.group(0).rstrip("/")).name or "/", str(err))


def _document_limits(schema: dict[str, Any], limit: int) -> None:
    """Write this server's token limit into the request schemas, where clients and schema tools read it."""
    for component in schema.get("components", {}).get("schemas", {}).values():
        for name in ("max_new_tokens", "max_tokens", "max_completion_tokens"):
            if name in component.get("properties", {}):
                component["properties"][name].update(minimum=1, maximum=limit)


class BodyLimit:
    """Answer 413 for bodies over `limit` bytes before the app parses anything (declared or streamed)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        # Read the (bounded) body here, then replay it; later receives pass through (disconnects).
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._reject(send)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send: Any) -> None:
        await _send_error(send, 413, f"request body over the limit of {self.limit} bytes")


class RequireKey:
    """Refuse every path but the public ones without the API key (Bearer or X-API-Key, exact case),
    compared in constant time, before routing or parsing."""

    def __init__(self, app: Any, key: str, public: set[str]):
        self.app, self.key, self.public = app, key.encode(), public

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        headers = {name.lower(): value for name, value in scope["headers"]}
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        if hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        await _send_error(
            send,
            401,
            "missing or wrong API key: send 'Authorization: Bearer KEY'",
            [(b"www-authenticate", b"Bearer")],
        )


async def _send_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class CountRequests:
    """Count every HTTP answer by route and outcome, the 413s of BodyLimit included.

    Plain ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware wraps `receive`, which hid a
    client's disconnect from a waiting non-streaming route (found by test).
    """

    def __init__(self, app: Any, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.paths else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                outcome = (
                    "ok"
                    if status < 400
                    else "rejected"
                    if status == 429
                    else "client_error"
                    if status < 500
                    else "server_error"
                )
                self.metrics.requests.labels(route, outcome).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _served_models(target: Any, adapters: dict[str, Path]) -> tuple[str, dict[str, str | None]]:
    """Names a request's `model` may use -> the PEFT adapter to decode with (None: no adapter)."""
    primary = Path(target.path).name if target.path is not None else target.model_cfg.name
    served: dict[str, str | None] = {primary: "default" if target.adapter_dir is not None else None}
    if target.adapter_dir is not None:
        # The bare base, by its name (a local base folder by its folder name: no server paths shown).
        base = target.model_cfg.name
        served.setdefault(Path(base).name if Path(base).expanduser().exists() else base, None)
    for name in adapters:
        served[name] = name
    return primary, served


def _load(
    app: FastAPI, cfg: Config, target: Any, adapters: dict[str, Path], generator: Generator | None
) -> None:
    from qlora_llm.model import attach_adapter, load_target

    state = app.state
    try:
        loaded = (
            generator.loaded
            if generator is not None
            else load_target(target, device=cfg.model.device, quantization=cfg.serve.quantization)
        )
        if adapters:
            model = loaded.model
            for name, path in adapters.items():
                # Names come from the server's own configuration, never from a request.
                model = attach_adapter(
                    model,
                    path,
                    name=name,
                    base_name=loaded.target.model_cfg.name,
                    allow_pickle=cfg.model.allow_pickle,
                )
            loaded.model = model.eval()
        state.generator = generator or Generator(loaded)
        state.generator.model = loaded.model
        engine = Engine(
            loaded,
            max_batch_size=cfg.serve.max_batch_size,
            batch_wait_s=cfg.serve.batch_wait_ms / 1000,
            max_queue=cfg.serve.max_queue,
            metrics=state.metrics,
        )
        engine.start()
        state.engine = engine
        log.info("serving %s as %s", target.name, ", ".join(state.served))
    except Exception as err:
        log.exception("loading %s failed", target.name)
        # /health is public: what went wrong, without the exception's type or the server's paths.
        state.load_error = public_message(err)


def create_app(
    cfg: Config,
    target: str | Path,
    *,
    adapters: dict[str, Path] | None = None,
    api_key: str | None = None,
    generator: Generator | None = None,
) -> FastAPI:
    """The server for TARGET (a run, adapter or merged folder, or a model name), plus named adapters."""
    from qlora_llm.model import adapter_folder, find_target
    from qlora_llm.server import routes

    adapters = dict(adapters or {})
    found = generator.loaded.target if generator is not None else find_target(target, cfg.model)
    for name, path in adapters.items():
        adapters[name] = adapter_folder(path, f"--adapter {name}=")  # the CLI prints it as one line

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=_load, args=(app, cfg, found, adapters, generator), daemon=True)
        thread.start()
        yield
        if app.state.engine is not None:
            app.state.engine.stop()

    app = FastAPI(
        title="qlora-llm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    state = app.state
    state.cfg, state.started = cfg, time.time()
    state.engine, state.generator, state.load_error = None, None, None
    state.metrics = Metrics()
    state.primary, state.served = _served_models(found, adapters)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(
                error_body(
                    400, "malformed JSON body: " + str(first.get("ctx", {}).get("error", first["msg"]))
                ),
                400,
            )
        field = ".".join(str(x) for x in first["loc"] if x != "body") or "body"
        return JSONResponse(error_body(422, f"{field}: {first['msg']}", field), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, dict) else {"message": str(exc.detail)}
        body = error_body(exc.status_code, detail["message"], detail.get("param"))
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, "internal server error"), 500)

    # Starlette runs the last added middleware first: count, limit the body, answer CORS preflights
    # (browsers send them without credentials), then check the key.
    if api_key:
        app.add_middleware(RequireKey, key=api_key, public=routes.PUBLIC_PATHS)
    if cfg.serve.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=cfg.serve.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(BodyLimit, limit=cfg.serve.max_body_bytes)
    app.add_middleware(CountRequests, metrics=state.metrics, paths=routes.PATHS)
    app.include_router(routes.public)
    app.include_router(routes.protected)
    schema_of = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _document_limits(schema_of(), cfg.serve.max_new_tokens_limit)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def serve(
    cfg: Config, target: str | Path, *, adapters: dict[str, Path] | None = None, api_key: str | None = None
) -> None:
    """Run the server with uvicorn on serve.host:serve.port (127.0.0.1:8000 by default), until stopped."""
    import uvicorn

    app = create_app(cfg, target, adapters=adapters, api_key=api_key)
    if cfg.serve.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", cfg.serve.host)
    # uvicorn re-raises the stop signal after its graceful shutdown, with the handler it found installed:
    # a no-op one makes a SIGTERM'd server exit 0 (a clean stop) instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish for shutdown_timeout_s, then
    # cancels the rest (a cancelled stream stops its generation) and runs the lifespan's engine stop.
    uvicorn.run(
        app,
        host=cfg.serve.host,
        port=cfg.serve.port,
        log_level="info",
        timeout_graceful_shutdown=cfg.serve.shutdown_timeout_s,
    )
