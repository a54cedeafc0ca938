"""`mlx_dlm.server`: an OpenAI-compatible HTTP API for one model, and a page that shows a canvas denoise.

    mlx_dlm.server --model shakespeare-dlm --port 8080
    curl localhost:8080/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 64, "steps": 16}'

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (models with a chat template), `GET /v1/models`,
`GET /health`, and `GET /` (the page, from `mlx_dlm/web/`, no CDN). Request and response bodies follow OpenAI's;
`"stream": true` answers with server-sent events. Diffusion options go as extra body fields (`SAMPLER_FIELDS`), and
`"stream_frames": true` streams every denoising step as the canvas, with each position's state. A field left out
takes the model's own default (its sampling.json, else SamplerOptions'), which `GET /v1/models` lists under
`"sampling"` (the page shows them).

One model is loaded; requests run one at a time behind a lock, at most `--max-queue` wait, and the rest get 503.
A client that disconnects mid-stream stops its generation. Bodies over `--max-body` bytes get 413. The default
bind is 127.0.0.1; any other address prints a warning. Built on the standard library's `http.server`.
"""

from __future__ import annotations

import argparse
import hmac
import json
import re
import select
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .decoding import check_writes_alone
from .errors import UserError, run_cli, warn
from .io import load
from .options import MODEL_FIELDS, SamplerOptions, options_for
from .sample import completion, stream_generate
from .speculative import check_drafter
from .tokenizer import chat_prompt
from .view import cells

DEFAULT_MODEL = "shakespeare-dlm"
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8080
DEFAULT_MAX_QUEUE = 8
DEFAULT_MAX_BODY = 1 << 20
DEFAULT_TIMEOUT = 60.0  # seconds a connection may sit idle in a read or a write
DEFAULT_DEADLINE = 600.0  # seconds one request's generation may run
WEB_DIR = Path(__file__).resolve().parent / "web"
# Body field -> SamplerOptions field (types and ranges: SamplerOptions.check); OpenAI's names first, then the
# diffusion options.
SAMPLER_FIELDS = {
    "max_tokens": "max_tokens", "temperature": "temp", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
    "steps": "steps", "strategy": "strategy", "schedule": "schedule", "threshold": "threshold",
    "block_length": "block_length", "cache": "cache", "cache_refresh": "cache_refresh", "remask": "remask",
    "suffix": "suffix", "template": "template", "alg_temp": "alg_temp", "cfg_scale": "cfg_scale",
    "draft_length": "draft_length", "block_steps": "block_steps",
}


class RequestError(Exception):
    """A client's mistake: becomes a 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def _as_request_error(message: str) -> RequestError:
    """SamplerOptions.check's message (which names command-line flags) in the body's field names, with the first
    field it names as the error's param."""
    param = None
    for field, name in SAMPLER_FIELDS.items():
        flag = re.compile(rf"(?<![\w-])--{name.replace('_', '-')}(?![\w-])")
        if flag.search(message):
            message = flag.sub(f"'{field}'", message)
            param = param or field
    return RequestError(message, param=param)


# OpenAI fields this server does not implement, with the one value that means "not used".
UNSUPPORTED = {"n": 1, "stop": None, "logprobs": None, "echo": False, "best_of": 1}
FLAGS = ("stream", "stream_frames")  # booleans: "false" (a string) is a mistake, not False


def _check_fields(body: dict) -> None:
    """400 for a field the server would otherwise ignore or misread."""
    for field, neutral in UNSUPPORTED.items():
        if field in body and body[field] not in (neutral, None):
            raise RequestError(f"'{field}' is not supported by this server", param=field)
    for field in FLAGS:
        if field in body and not isinstance(body[field], bool):
            raise RequestError(f"'{field}' must be true or false, got {body[field]!r}", param=field)


class ModelServer:
    """The loaded model, the lock that serialises generation, and the bounded queue in front of it."""

    def __init__(self, model_path: str, max_queue: int = DEFAULT_MAX_QUEUE, max_body: int = DEFAULT_MAX_BODY,
                 draft_path: str | None = None):
        self.model, self.tokenizer = load(model_path)
        check_writes_alone(self.model)
        self.draft = None  # a diffusion drafter: every request is decoded speculatively (`speculative.py`)
        if draft_path is not None:
            self.draft, draft_tokenizer = load(draft_path)
            check_drafter(self.model, self.draft, self.tokenizer, draft_tokenizer)
        self.name = Path(str(model_path)).name
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(max_queue + 1)  # the running request and max_queue waiting
        self.max_body = max_body
        self.max_tokens = self.model.args.max_seq_len  # what one request may ask for (make_server may lower it)

    def options(self, body: dict) -> SamplerOptions:
        """The request's decoding options, checked (types and ranges) before it may queue."""
        fields = {name: body[field] for field, name in SAMPLER_FIELDS.items() if body.get(field) is not None}
        try:
            options = options_for(self.model, fields, self.draft).check()
        except UserError as err:
            raise _as_request_error(str(err)) from None
        limit = self.max_tokens
        if "max_tokens" not in fields:  # the default length, within what this server allows
            options = options.replace(max_tokens=min(options.max_tokens, limit))
        if options.max_tokens > limit:
            raise RequestError(f"'max_tokens' must be between 1 and {limit} (the model's context, or the server's "
                               f"--max-tokens)", param="max_tokens")
        return options

    def sampling(self) -> dict:
        """The options a request that gives none decodes with (the model's defaults), by body field name."""
        defaults = self.options({})
        return {field: getattr(defaults, name) for field, name in SAMPLER_FIELDS.items() if name in MODEL_FIELDS}

    def prompt_of(self, body: dict, chat: bool) -> str:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise RequestError("'messages' must be a non-empty list of {role, content} objects", param="messages")
            try:
                return chat_prompt(self.tokenizer, messages)
            except UserError as err:
                raise RequestError(str(err), param="messages") from None
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("'prompt' must be a string", param="prompt")
        return prompt

    def steps(self, prompt: str, options: SamplerOptions):
        """The generation's states; a UserError from the sampler (unknown character, canvas too long) becomes a 400."""
        try:
            yield from stream_generate(self.model, self.tokenizer, prompt, options, self.draft)
        except UserError as err:
            raise RequestError(str(err)) from None


def _frame(tokenizer, step) -> dict:
    """One denoising step for the page: each position's text and kind (given, masked, new, remasked, done)."""
    return {"object": "text_completion.frame", "step": step.step, "nfe": step.nfe,
            "generated_tokens": step.generated_tokens, "tokens_per_sec": step.tokens_per_sec,
            "cells": cells(step, tokenizer)}


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the ModelServer held by the HTTP server."""

    server_version = "mlx_dlm"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> ModelServer:
        return self.server.app

    def setup(self) -> None:
        self.timeout = getattr(self.server, "timeout_s", DEFAULT_TIMEOUT)  # every read and write on the socket
        super().setup()

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, as http.server does
        if not getattr(self.server, "quiet", False):
            super().log_message(format, *args)

    def end_headers(self) -> None:
        self.send_header("X-Frame-Options", "DENY")  # no page may frame this one
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def _check_origin(self) -> None:
        """403 for a Host or Origin that is not this server (DNS rebinding, cross-site pages) on a loopback bind,
        401 without the API key when the server has one."""
        allowed = getattr(self.server, "allowed_hosts", None)
        if allowed is not None:
            if self.headers.get("Host", "").lower() not in allowed:
                raise RequestError(f"Host {self.headers.get('Host')!r} is not this server", status=403,
                                   kind="forbidden")
            origin = self.headers.get("Origin")
            if origin is not None and origin.lower().partition("://")[2] not in allowed:
                raise RequestError(f"Origin {origin!r} may not use this server", status=403, kind="forbidden")
        key = self._api_key
        if key is not None and self.path.startswith("/v1/") and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            raise RequestError("a valid API key is required (Authorization: Bearer KEY)", status=401,
                               kind="authentication_error")

    @property
    def _api_key(self) -> str | None:
        """The key /v1/ requires (--api-key), or None."""
        return getattr(self.server, "api_key", None)

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        self._send_json(err.status, {"error": {"message": str(err), "type": err.kind, "param": err.param,
                                               "code": None}})

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0]
        try:
            self._check_origin()
        except RequestError as err:
            self._error(err)
            return
        if path == "/health":  # open: says whether /v1/ wants a key, so the page asks for one before calling it
            self._send_json(200, {"status": "ok", "api_key_required": self._api_key is not None})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [{"id": self.app.name, "object": "model",
                                                              "created": 0, "owned_by": "mlx-dlm",
                                                              "model_type": self.app.model.args.model_type,
                                                              "sampling": self.app.sampling()}]})
        elif path in ("/", "/index.html"):
            self._static(WEB_DIR / "index.html", "text/html; charset=utf-8")
        else:
            self._error(RequestError(f"no route {path}", status=404, kind="not_found_error"))

    def _static(self, path: Path, content_type: str) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        if "Transfer-Encoding" in self.headers:
            raise RequestError("Transfer-Encoding is not supported: send the body with a Content-Length", status=501)
        declared = self.headers.get("Content-Length")
        if declared is None:
            raise RequestError("a POST needs a Content-Length", status=411)
        if not re.fullmatch(r"[0-9]+", declared.strip()):
            raise RequestError(f"bad Content-Length {declared!r}")
        length = int(declared)
        if length > self.app.max_body:
            raise RequestError(f"request body over {self.app.max_body} bytes", status=413)
        try:
            raw = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {self.timeout:g} s", status=408) from None
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as err:
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err)
            raise RequestError(f"malformed JSON ({reason})") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if body.get("model") not in (None, self.app.name):
            raise RequestError(f"unknown model {body['model']!r}: this server has {self.app.name!r}", param="model")
        _check_fields(body)
        return body

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0]
        chat = path == "/v1/chat/completions"
        try:
            self._check_origin()
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(f"no route {path}", status=404, kind="not_found_error")
            if self.headers.get_content_type() != "application/json":
                raise RequestError("the body must be sent as Content-Type: application/json", status=415)
            body = self._body()
            prompt = self.app.prompt_of(body, chat)
            options = self.app.options(body)
            if not self.app.slots.acquire(blocking=False):
                raise RequestError("the server is busy: too many requests waiting; retry later", status=503,
                                   kind="server_busy")
        except RequestError as err:
            self.close_connection = True
            self._error(err)
            return
        try:
            with self.app.lock:
                self._generate(body, prompt, options, chat)
        except RequestError as err:
            self.close_connection = True
            self._error(err)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):  # the client left or stopped reading
            self.close_connection = True
        except Exception as err:  # a bug: still an answer, never a dropped connection
            self.close_connection = True
            self.log_error("internal error: %r", err)
            self._error(RequestError(f"internal error ({type(err).__name__})", status=500, kind="server_error"))
        finally:
            self.app.slots.release()

    def _generate(self, body: dict, prompt: str, options: SamplerOptions, chat: bool) -> None:
        stream, frames = bool(body.get("stream")), bool(body.get("stream_frames"))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        steps = self._within_deadline(self.app.steps(prompt, options))
        if not (stream or frames):
            last = None
            for last in steps:
                if self._client_gone():  # nobody to answer: stop generating
                    steps.close()
                    self.close_connection = True
                    return
            self._send_json(200, self._final(ident, created, last, chat))
            return
        last = next(steps)  # a bad request fails here, before any event is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        try:
            if frames:
                self._event(_frame(self.app.tokenizer, last))
            for last in steps:
                if frames:
                    self._event(_frame(self.app.tokenizer, last))
                else:  # an SSE comment per step: clients ignore it, and a departed client is noticed at once
                    self.wfile.write(b": step\n\n")
                    self.wfile.flush()
            self._event(self._final(ident, created, last, chat, chunk=True))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            steps.close()  # the client left, or stopped reading for --timeout seconds: stop generating
        except RequestError as err:  # past the deadline mid-stream: an error event ends the stream
            self._event({"error": {"message": str(err), "type": err.kind, "param": None, "code": None}})

    def _within_deadline(self, steps):
        """The generation's states until --deadline seconds have passed: then a 504 (before anything was sent)."""
        limit = getattr(self.server, "deadline_s", DEFAULT_DEADLINE)
        deadline = time.monotonic() + limit
        try:
            for state in steps:
                yield state
                if time.monotonic() > deadline:
                    raise RequestError(f"the generation ran past the server's --deadline of {limit:g} s",
                                       status=504, kind="timeout")
        finally:
            steps.close()

    def _client_gone(self) -> bool:
        """Whether the client closed its connection (readable, with nothing left to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _final(self, ident: str, created: int, last, chat: bool, chunk: bool = False) -> dict:
        text, reason = completion(self.app.tokenizer, last)
        prompt_tokens = int((~last.editable).sum())
        if chat:
            choice = {"index": 0, "finish_reason": reason,
                      ("delta" if chunk else "message"): {"role": "assistant", "content": text}}
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            kind = "text_completion"
        return {"id": ident, "object": kind, "created": created, "model": self.app.name, "choices": [choice],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": last.generated_tokens,
                          "total_tokens": prompt_tokens + last.generated_tokens},
                "nfe": last.nfe, "tokens_per_sec": last.tokens_per_sec}


def make_server(model_path: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                max_queue: int = DEFAULT_MAX_QUEUE, max_body: int = DEFAULT_MAX_BODY, quiet: bool = False,
                draft: str | None = None, timeout: float = DEFAULT_TIMEOUT, api_key: str | None = None,
                max_tokens: int | None = None, deadline: float = DEFAULT_DEADLINE):
    """A ThreadingHTTPServer serving the model (port 0: any free port; see server.server_address); with draft,
    a diffusion model that drafts for it (speculative decoding)."""
    app = ModelServer(model_path, max_queue, max_body, draft)
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror})") from None
    server.daemon_threads = True
    server.app, server.quiet, server.timeout_s, server.api_key = app, quiet, timeout, api_key
    server.deadline_s = deadline
    app.max_tokens = min(max_tokens or app.model.args.max_seq_len, app.model.args.max_seq_len)
    bound = server.server_address[1]
    names = ("localhost", "127.0.0.1", "[::1]", host if ":" not in host else f"[{host}]")
    loopback = host in ("127.0.0.1", "localhost", "::1")
    server.allowed_hosts = {f"{n}:{bound}" for n in names} | ({*names} if bound == 80 else set()) \
        if loopback else None  # a server bound beyond loopback is reached by other names: --api-key guards it
    return server


def setup_arg_parser() -> argparse.ArgumentParser:
    """Flags of mlx_dlm.server."""
    p = argparse.ArgumentParser(prog="mlx_dlm.server", description="Serve a model over HTTP (OpenAI-compatible).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory, shipped model or Hub repo")
    p.add_argument("--host", default=DEFAULT_HOST, help="address to bind (anything but loopback is reachable by others)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, help="requests that may wait; more get 503")
    p.add_argument("--max-body", type=int, default=DEFAULT_MAX_BODY, help="largest request body in bytes (413 above)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ requests (the page has a field "
                                     "for it)")
    p.add_argument("--max-tokens", type=int, help="the most tokens one request may ask for (default: the context)")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE,
                   help="seconds one request's generation may run (504 after, or the stream ends)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="seconds a connection may wait in a read or a write (a client that stops reading is dropped "
                        "and its generation stopped)")
    p.add_argument("--draft", metavar="DLM_DIR",
                   help="speculative decoding: this diffusion model drafts for --model (autoregressive); requests "
                        "may set draft_length")
    return p


def _main(argv: list[str] | None) -> None:
    args = setup_arg_parser().parse_args(argv)
    if args.max_queue < 0 or args.max_body < 1:
        raise UserError("--max-queue must be >= 0 and --max-body >= 1")
    if not args.timeout > 0 or not args.deadline > 0:
        raise UserError("--timeout and --deadline must be positive")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"binding {args.host}: the server is reachable from other machines" +
             ("" if args.api_key else ", with no authentication (--api-key KEY adds it)"))
    if args.max_tokens is not None and args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    server = make_server(args.model, args.host, args.port, args.max_queue, args.max_body, draft=args.draft,
                         timeout=args.timeout, api_key=args.api_key, max_tokens=args.max_tokens,
                         deadline=args.deadline)
    host, port = server.server_address[:2]
    print(f"mlx_dlm.server: {server.app.name} on http://{host}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
