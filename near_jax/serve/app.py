"""The HTTP server: OpenAI-compatible routes over the engine, metered, signed, attested.

    POST /v1/completions            prompt (string or list), sampling options, stream (SSE)
    POST /v1/chat/completions       messages, in the plain template of `chat`
    GET  /v1/models                 the one served model
    GET  /v1/signature/{id}         the signature of a reply (streamed ones included)
    GET  /v1/attestation/report     ?nonce=HEX: signing key, params and code hashes, quote
    GET  /health                    200 while the engine runs, else 503
    GET  /metrics                   Prometheus text

An ASGI app (Starlette, served by uvicorn, as vLLM's API server): request handlers are
coroutines, the engine runs in its own thread and hands tokens over through the event loop,
so thousands of open streams cost no threads.

Every reply carries `usage` (streams: a last event with no choices, as OpenAI's
include_usage). Token counts: prompt_tokens counts the prompt as tokenized with BOS;
completion_tokens counts the tokens generated, the EOS that ended a sequence included, and
up to the one that completed a stop string. A request is metered once, when it ends
(finished, stopped, or its client gone): its usage is one row of the ledger, or, if the
server dies first, none. Errors are JSON naming the field: 400 bad input, 401 unknown key,
402 over the key's limit, 404 unknown model or signature, 413 body too large, 429 queue
full, 503 engine down.

Signatures: each reply is signed as "sha256(request body):sha256(response body)" with the
server's ed25519 key (`attestation.sign_exchange`); a whole reply carries it in the
`X-Signature*` headers, and any reply's (a stream's: its bytes as sent) is kept for
GET /v1/signature/{id} (the last SIGNATURES_KEPT replies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from near_jax.contrib.identity import Identity
from near_jax.data.tokenizer import Tokenizer
from near_jax.serve import attestation, chat, engine, metering, wire
from near_jax.serve.inflight import EngineFailed, InFlight, merged
from near_jax.serve.metrics import CONTENT_TYPE, ServerMetrics
from near_jax.serve.text import TextStream

MAX_BODY_BYTES = 4 << 20
SIGNATURES_KEPT = 10_000


class HttpError(Exception):
    """A refusal: HTTP status, one-line message, and the field it is about."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


@dataclasses.dataclass
class Service:
    """Everything the routes use."""

    engine: engine.Engine
    tokenizer: Tokenizer
    meter: metering.Meter
    identity: Identity
    provider: Any  # attestation.Provider
    model: str  # the id clients name
    context: int  # tokens of prompt plus output at most
    params_sha256: str
    code_sha256: str
    created: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class _Exchange:
    """A generation request once admitted: what replying, signing and metering need."""

    raw: bytes  # the request body, as signed
    endpoint: str  # "completions" or "chat"
    response_id: str
    created: float
    sequences: list[InFlight]
    reservation: Any  # metering.Reservation


class Server:
    """The routes over one `Service`."""

    def __init__(self, service: Service):
        self.s = service
        self.metrics = ServerMetrics(service.engine.stats)
        self.signatures: collections.OrderedDict[str, dict] = collections.OrderedDict()

    # ------------------------------------------------------------------------ plumbing

    def _keep_signature(self, response_id: str, signed: dict) -> None:
        self.signatures[response_id] = signed
        while len(self.signatures) > SIGNATURES_KEPT:
            self.signatures.popitem(last=False)

    def _error(self, e: HttpError, endpoint: str) -> JSONResponse:
        self.metrics.observe_request(endpoint, e.status)
        body = wire.error(str(e), e.kind, e.status, e.param)
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(body, status_code=e.status, headers=headers)

    async def _read_body(self, request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise HttpError(413, f"the body is over {MAX_BODY_BYTES} bytes", "invalid_request")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise HttpError(413, f"the body is over {MAX_BODY_BYTES} bytes", "invalid_request")
        return body

    def _authorize(self, request: Request) -> Any:
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else None
        try:
            return self.s.meter.authorize(secret or None)
        except metering.Unauthorized as e:
            raise HttpError(401, str(e), "authentication_error") from None

    def _check_model(self, options: wire.Options) -> None:
        if options.model is not None and options.model != self.s.model:
            raise HttpError(
                404,
                f"model {options.model!r} is not served here: this server serves {self.s.model!r}",
                "not_found",
                "model",
            )

    def _engine_request(self, ids: list[int], options: wire.Options) -> engine.Request:
        max_tokens = options.max_tokens
        if max_tokens is None:  # as many as the context leaves, as vLLM
            max_tokens = max(self.s.context - len(ids), 1) if self.s.context else 256
        seed = options.seed if options.seed is not None else secrets.randbits(31)
        request = engine.Request(
            prompt=tuple(ids),
            max_tokens=max_tokens,
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            seed=seed,
        )
        try:
            self.s.engine.check(request)
        except ValueError as e:
            message = str(e)
            param = "max_tokens" if "max_tokens" in message else "prompt"
            raise HttpError(400, message, "invalid_request", param) from None
        return request

    def _start(
        self, key: Any, prompts: list[list[int]], options: wire.Options, stops: tuple[str, ...]
    ) -> tuple[list[InFlight], Any]:
        """Checks, reserves the worst-case cost, and submits one sequence per prompt."""
        requests = [self._engine_request(ids, options) for ids in prompts]
        prompt_tokens = sum(len(ids) for ids in prompts)
        try:
            reservation = self.s.meter.reserve(
                key, prompt_tokens, sum(r.max_tokens for r in requests)
            )
        except metering.OverLimit as e:
            raise HttpError(402, str(e), "insufficient_quota") from None
        loop = asyncio.get_running_loop()
        sequences: list[InFlight] = []
        try:
            for request in requests:
                seq = InFlight(loop, TextStream(self.s.tokenizer, stops), len(request.prompt))
                seq.ticket = self.s.engine.submit(request, seq.emit)
                sequences.append(seq)
        except engine.QueueFull:
            for seq in sequences:
                seq.ticket.cancel()
            self.s.meter.release(reservation)
            raise HttpError(429, "the server is at capacity: retry later", "rate_limit") from None
        except Exception:
            for seq in sequences:
                seq.ticket.cancel()
            self.s.meter.release(reservation)
            raise
        return sequences, reservation

    def _settle(self, x: _Exchange) -> dict[str, int]:
        """Records the request's usage (once) and returns its `usage` object (waiting on
        the disk in this thread: for the rare ends, a failure or a cancel)."""
        self.s.meter.settle(*self._usage(x))
        return self._observe(x)

    async def _settled(self, x: _Exchange) -> dict[str, int]:
        """_settle without blocking the event loop: the record joins the ledger's group
        commit, and the response waits until it is committed."""
        await asyncio.wrap_future(self.s.meter.settle_later(*self._usage(x)))
        return self._observe(x)

    def _usage(self, x: _Exchange) -> tuple:
        """meter.settle's arguments for the exchange."""
        sequences = x.sequences
        prompt_tokens = sum(s.prompt_tokens for s in sequences)
        completion_tokens = sum(s.generated for s in sequences)
        finish = _request_finish([s.finish for s in sequences])
        used = (prompt_tokens, completion_tokens, finish, x.created)
        return (x.reservation, x.response_id, self.s.model, *used)

    def _observe(self, x: _Exchange) -> dict[str, int]:
        """Records the sequences' token timings; the request's `usage` object."""
        sequences = x.sequences
        prompt_tokens = sum(s.prompt_tokens for s in sequences)
        completion_tokens = sum(s.generated for s in sequences)
        for s in sequences:
            if s.first_token_at is not None:
                per_token = None
                if s.generated > 1 and s.last_token_at is not None:
                    per_token = (s.last_token_at - s.first_token_at) / (s.generated - 1)
                self.metrics.observe_tokens(s.first_token_at - s.arrived, per_token)
        return wire.usage(prompt_tokens, completion_tokens)

    # -------------------------------------------------------------------------- routes

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        return await self._generate(request, "completions")

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, endpoint: str) -> Response:
        arrived = time.perf_counter()
        try:
            key = self._authorize(request)
            raw = await self._read_body(request)
            try:
                body = wire.parse_chat(raw) if endpoint == "chat" else wire.parse_completion(raw)
            except wire.BadRequest as e:
                raise HttpError(400, str(e), "invalid_request", _param_of(str(e))) from None
            options = body.options
            self._check_model(options)
            tok = self.s.tokenizer
            if endpoint == "chat":
                texts = [chat.render(body.messages)]
                stops = (*options.stop, chat.TURN_STOP)
            else:
                texts, stops = list(body.prompts), options.stop
            prompts = [[tok.bos_id, *tok.encode(t)] for t in texts]
            sequences, reservation = self._start(key, prompts, options, stops)
        except HttpError as e:
            return self._error(e, endpoint)
        for seq in sequences:
            seq.arrived = arrived
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        response_id = prefix + uuid.uuid4().hex
        created = time.time()
        x = _Exchange(raw, endpoint, response_id, created, sequences, reservation)
        if options.stream:
            stream = self._stream(x)
            headers = {"X-Request-Id": response_id, "Cache-Control": "no-cache"}
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        return await self._whole(x)

    async def _whole(self, x: _Exchange) -> Response:
        raw, endpoint, response_id, created = x.raw, x.endpoint, x.response_id, x.created
        sequences = x.sequences
        texts = ["" for _ in sequences]

        async def collect(i: int) -> None:
            while (piece := await sequences[i].next_text()) is not None:
                texts[i] += piece

        try:
            await asyncio.gather(*(collect(i) for i in range(len(sequences))))
        except BaseException as e:  # an engine failure, or this handler cancelled
            for s in sequences:
                if s.finish is None:
                    s.ticket.cancel()
            self._settle(x)
            if isinstance(e, EngineFailed):
                return self._error(HttpError(503, str(e), "server_error"), endpoint)
            raise
        used = await self._settled(x)
        finishes = [s.finish or "stop" for s in sequences]
        if endpoint == "chat":
            reply = wire.chat_completion(
                response_id, self.s.model, int(created), texts[0], finishes[0], used
            )
        else:
            reply = wire.completion(response_id, self.s.model, int(created), texts, finishes, used)
        body = json.dumps(reply, ensure_ascii=False).encode()
        signed = attestation.sign_exchange(self.s.identity, raw, body)
        self._keep_signature(response_id, signed)
        elapsed = time.perf_counter() - sequences[0].arrived
        self.metrics.observe_request(
            endpoint, 200, used["prompt_tokens"], used["completion_tokens"], elapsed
        )
        headers = {
            "X-Request-Id": response_id,
            "X-Signature": signed["signature"],
            "X-Signature-Text": signed["text"],
            "X-Signing-Key": signed["signing_key"],
        }
        return Response(body, media_type="application/json", headers=headers)

    async def _stream(self, x: _Exchange) -> AsyncIterator[bytes]:
        raw, endpoint, response_id, created = x.raw, x.endpoint, x.response_id, x.created
        sequences = x.sequences
        model, stamp = self.s.model, int(created)
        sent: list[bytes] = []
        used: dict[str, int] | None = None
        status = 499  # nginx's "client closed request": the stream was cut before its end

        def out(event: bytes) -> bytes:
            sent.append(event)
            return event

        try:
            if endpoint == "chat":
                first = wire.chat_chunk(response_id, model, stamp, {"role": "assistant"}, None)
                yield out(wire.sse(first))
            # Several prompts stream interleaved, each event as it comes.
            async for i, text in merged(sequences):
                if text:
                    if endpoint == "chat":
                        event = wire.chat_chunk(response_id, model, stamp, {"content": text}, None)
                    else:
                        event = wire.completion_chunk(response_id, model, stamp, i, text, None)
                    yield out(wire.sse(event))
                fin = sequences[i].finish
                if fin is not None:
                    if endpoint == "chat":
                        end = wire.chat_chunk(response_id, model, stamp, {}, fin)
                    else:
                        end = wire.completion_chunk(response_id, model, stamp, i, "", fin)
                    yield out(wire.sse(end))
            used = await self._settled(x)
            obj = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
            yield out(wire.sse(wire.usage_chunk(response_id, model, stamp, obj, used)))
            yield out(wire.SSE_DONE)
            status = 200
        except EngineFailed as e:
            status = 503
            yield out(wire.sse(wire.error(str(e), "server_error", 503)))
        finally:
            for s in sequences:
                if s.finish is None:
                    s.ticket.cancel()
            if used is None:  # the client went away, or the engine failed: bill what was made
                used = self._settle(x)
            self._keep_signature(
                response_id, attestation.sign_exchange(self.s.identity, raw, b"".join(sent))
            )
            elapsed = time.perf_counter() - sequences[0].arrived
            self.metrics.observe_request(
                endpoint, status, used["prompt_tokens"], used["completion_tokens"], elapsed
            )

    async def models(self, request: Request) -> Response:
        """GET /v1/models."""
        return JSONResponse(wire.models(self.s.model, self.s.created))

    async def signature(self, request: Request) -> Response:
        """GET /v1/signature/{id}."""
        response_id = request.path_params["response_id"]
        signed = self.signatures.get(response_id)
        if signed is None:
            e = HttpError(404, f"no signature kept for {response_id!r}", "not_found", "id")
            return self._error(e, "signature")
        return JSONResponse({"id": response_id, **signed})

    async def report(self, request: Request) -> Response:
        """GET /v1/attestation/report?nonce=HEX."""
        nonce = request.query_params.get("nonce", "")
        try:
            report = attestation.report(
                self.s.identity,
                self.s.provider,
                nonce,
                model=self.s.model,
                params_sha256=self.s.params_sha256,
                code_sha256=self.s.code_sha256,
            )
        except ValueError as e:
            return self._error(HttpError(400, str(e), "invalid_request", "nonce"), "attestation")
        return JSONResponse(report)

    async def health(self, request: Request) -> Response:
        """GET /health: 200 while the engine runs."""
        stats = self.s.engine.stats()
        ok = not stats.get("error")
        body = {"status": "ok" if ok else "error", "model": self.s.model, **_plain(stats)}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    def app(self, on_shutdown: list[Callable[[], Any]] = ()) -> Starlette:
        """The ASGI app."""
        routes = [
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/signature/{response_id}", self.signature, methods=["GET"]),
            Route("/v1/attestation/report", self.report, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics_text, methods=["GET"]),
        ]
        shutdown = list(on_shutdown)

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            yield
            for fn in shutdown:  # after the last request: stop the engine, close the ledger
                fn()

        return Starlette(routes=routes, lifespan=lifespan)


def _request_finish(finishes: list[str | None]) -> str:
    """How a request ended, for its usage row: cancelled if any sequence was cut short (the
    client left, or the engine failed), else length if any ran out of tokens, else stop."""
    if any(f is None for f in finishes):
        return "cancelled"
    return "length" if "length" in finishes else "stop"


def _param_of(message: str) -> str | None:
    """The field a BadRequest message starts with, if it names one."""
    head = message.split(" ", 1)[0].split("=", 1)[0].split("[", 1)[0]
    return head if head.isidentifier() and head not in ("the", "unknown") else None


def _plain(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))}
