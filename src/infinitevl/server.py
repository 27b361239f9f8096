"""OpenAI-compatible HTTP server (`infinitevl serve`).

- `POST /v1/chat/completions`: one JSON answer, or server-sent events with `"stream": true`.
- `GET /v1/models`, `GET /health`.

Messages are OpenAI's (string content, or `text` / `image_url` / `video_url` parts) or the model card's
(`{"type": "image", "image": ...}` / `{"type": "video", "video": ...}` items with their qwen_vl_utils options),
answered as `infinitevl generate` answers them. Media come as data: URIs; http(s) image URLs only with
`--allow-urls`, local files only under `--media-dir`; text holding chat-format tokens only with
`--allow-special-tokens`. Requests are generated together, up to `--max-batch-size` at a time (continuous
batching: they join and leave the decode batch between steps, and prompts go in chunk by chunk between steps);
more wait their turn. `n` choices share one prefill; `logprobs` come from the decode step. A bad request is
answered with an HTTP 4xx and an OpenAI-style error body naming the problem, before anything is generated.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import select
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .chat import STRUCTURAL, TextStream, chat_inputs
from .inference.request import answer_stop_ids
from .inference.sampling import MAX_TEMPERATURE, SamplingParams
from .inference.engine import MAX_TOP_LOGPROBS
from .inference.scheduler import SchedulerClosed

MAX_STOP_STRINGS = 4  # as OpenAI's API
SOCKET_TIMEOUT_S = 120
MAX_STOP_CHARS = 256  # streamed text waits for (longest stop - 1) characters
# the content-item options a request may give, beside the source (qwen_vl_utils' names)
ITEM_OPTIONS = {"image": ("min_pixels", "max_pixels", "resized_height", "resized_width"),
                "video": ("fps", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames",
                          "resized_height", "resized_width", "sample_fps")}
READ_FIELDS = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
               "stop", "stream", "stream_options", "n", "logprobs", "top_logprobs")
# Fields OpenAI clients send that change nothing here when they hold these values (other values are refused).
DEFAULT_ONLY = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "tools": ([],),
                "tool_choice": ("none",), "response_format": ({"type": "text"},)}
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")


class RequestError(ValueError):
    """A request that cannot be served: the HTTP status and a message naming the problem and the fix."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST, param: str | None = None):
        super().__init__(message)
        self.status, self.param = int(status), param


@dataclass(frozen=True)
class MessageRules:
    """What a request's messages may hold besides plain text and data: URIs."""

    media_dir: Path | None = None  # local files under this folder (resolved); None: no local file
    urls: bool = False  # http(s) URLs, fetched by the server
    special_tokens: bool = False  # chat-format tokens (<|im_start|>, ...) written in a message's text pass through


@dataclass
class ChatRequest:
    messages: list[dict]  # the model card's format
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    n: int = 1  # answers (choices) to generate for the prompt
    top_logprobs: int | None = None  # None: no logprobs; K: each token's logprob and its K likeliest alternatives


# ---- reading a request ----
def _number(body: dict, key: str, default, *, whole: bool = False, lo: float | None = None, hi: float | None = None):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not whole or value == int(value)) and (lo is None or value >= lo) and (hi is None or value <= hi)
    if not ok:
        kind = "a whole number" if whole else "a number"
        bounds = (f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else f" >= {lo:g}" if lo is not None
                  else "")
        raise RequestError(f"'{key}' must be {kind}{bounds}, got {value!r}", param=key)
    return int(value) if whole else float(value)


def parse_request(body, *, served: str, defaults: SamplingParams, default_max_tokens: int, max_tokens_limit: int,
                  rules: MessageRules = MessageRules(), max_n: int = 8) -> ChatRequest:
    """A chat completion request body (parsed JSON) -> ChatRequest, or a RequestError naming what is wrong."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in READ_FIELDS or key in IGNORED or value is None:
            continue
        if key in DEFAULT_ONLY:
            if not any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in DEFAULT_ONLY[key]):
                raise RequestError(f"'{key}': {value!r} is not supported by this server (it serves "
                                   f"{DEFAULT_ONLY[key][0]!r} only): leave the field out", param=key)
            continue
        raise RequestError(f"unknown field '{key}': this server reads {', '.join(READ_FIELDS)}", param=key)
    model = body.get("model")
    if model is not None and model != served:
        raise RequestError(f"model {model!r} is not served here: this server serves {served!r} (GET /v1/models)",
                           HTTPStatus.NOT_FOUND, "model")
    max_tokens = _number(body, "max_tokens", None, whole=True, lo=1)
    max_completion = _number(body, "max_completion_tokens", None, whole=True, lo=1)
    if None not in (max_tokens, max_completion) and max_tokens != max_completion:
        raise RequestError(f"'max_tokens' ({max_tokens}) and 'max_completion_tokens' ({max_completion}) differ: give "
                           "one", param="max_tokens")
    max_tokens = max_completion or max_tokens or default_max_tokens
    if max_tokens > max_tokens_limit:
        raise RequestError(f"max_tokens {max_tokens} is above this server's limit of {max_tokens_limit} (its "
                           "--max-tokens-limit)", param="max_tokens")
    try:
        sampling = SamplingParams(_number(body, "temperature", defaults.temperature, lo=0, hi=MAX_TEMPERATURE),
                                  _number(body, "top_k", defaults.top_k, whole=True, lo=0, hi=2**31 - 1),
                                  _number(body, "top_p", defaults.top_p))
    except RequestError:
        raise
    except ValueError as e:
        raise RequestError(f"{e} (temperature, top_k, top_p)") from None
    seed = _number(body, "seed", None, whole=True, lo=0, hi=2**63 - 1)
    n = _number(body, "n", 1, whole=True, lo=1)
    if n > max_n:
        raise RequestError(f"'n' is {n}, above this server's {max_n} (its --max-batch-size: each choice takes a "
                           "row)", param="n")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
            and len(stop) <= MAX_STOP_STRINGS):
        raise RequestError(f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                           f"{MAX_STOP_STRINGS} of them, got {body.get('stop')!r:.100}", param="stop")
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream' must be true or false and 'stream_options' at most {\"include_usage\": bool}",
                           param="stream")
    logprobs = body.get("logprobs")
    logprobs = False if logprobs is None else logprobs
    if not isinstance(logprobs, bool):
        raise RequestError(f"'logprobs' must be true or false, got {logprobs!r:.100}", param="logprobs")
    top = _number(body, "top_logprobs", None, whole=True, lo=0, hi=MAX_TOP_LOGPROBS)
    if top and not logprobs:
        raise RequestError("'top_logprobs' needs \"logprobs\": true", param="top_logprobs")
    return ChatRequest(messages=chat_messages(body.get("messages"), rules), max_tokens=max_tokens,
                       sampling=sampling, stop=stop, seed=seed, stream=stream,
                       include_usage=bool(options.get("include_usage")), n=n,
                       top_logprobs=(top or 0) if logprobs else None)


def chat_messages(messages, rules: MessageRules = MessageRules()) -> list[dict]:
    """OpenAI or model-card messages -> the model card's format (image_url / video_url parts become image / video
    items), with every media source and text checked against the server's rules."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param="messages")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}: role {m.get('role')!r} is not supported (system, developer, user, assistant)",
                               param="messages")
        content = m.get("content")
        if isinstance(content, list):
            content = [_part(p, f"{where}.content[{j}]", rules) for j, p in enumerate(content)]
        elif not isinstance(content, str):
            raise RequestError(f"{where}: 'content' must be a string or a list of parts, got {content!r:.60}",
                               param="messages")
        if not rules.special_tokens:
            texts = [content] if isinstance(content, str) else [p["text"] for p in content if p["type"] == "text"]
            found = next((t for t in STRUCTURAL for x in texts if t in x), None)
            if found:
                raise RequestError(f"{where} contains {found} in its text: the chat format writes these tokens itself, "
                                   "and in a message they would act as turns or media (give images and videos as "
                                   "parts; a server started with --allow-special-tokens passes them through)",
                                   param="messages")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RequestError(f"the last message must be the user's (it is the {out[-1]['role']}'s): the server answers "
                           "it", param="messages")
    last = out[-1]["content"]
    if not (last.strip() if isinstance(last, str) else any(p.get("type") != "text" or p["text"].strip() for p in last)):
        raise RequestError("the last message says nothing: give it text, an image or a video", param="messages")
    return out


def _part(part, where: str, rules: MessageRules) -> dict:
    if not isinstance(part, dict):
        raise RequestError(f"{where} must be an object such as {{\"type\": \"text\", \"text\": ...}}", param="messages")
    kind = part.get("type") or next((k for k in ("text", "image", "video", "image_url", "video_url") if k in part), None)
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}: a text part needs a string 'text'", param="messages")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "video_url"):
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        extra = set(part) - {"type", kind}
        item = {"type": kind[:5], kind[:5]: url}
    elif kind in ("image", "video"):
        if kind not in part:
            raise RequestError(f"{where}: an {kind} item needs its source in '{kind}'", param="messages")
        extra = set(part) - {"type", kind, *ITEM_OPTIONS[kind]}
        item = {k: v for k, v in part.items() if k != "type"}
        item["type"] = kind
    else:
        raise RequestError(f"{where}: unsupported part type {kind!r} (text, image_url, video_url, image, video)",
                           param="messages")
    if extra:
        raise RequestError(f"{where}: unsupported key(s) {sorted(extra)} in a {kind} part (an image item takes "
                           f"{', '.join(ITEM_OPTIONS['image'])}; a video item {', '.join(ITEM_OPTIONS['video'])})",
                           param="messages")
    key = item["type"]
    src = item[key]
    item[key] = ([_source(s, f"{where} frame {k}", rules) for k, s in enumerate(src)]
                 if key == "video" and isinstance(src, list) else _source(src, where, rules))
    return item


def _source(src, where: str, rules: MessageRules) -> str:
    """A media source as the server may read it: a data: URI, an http(s) URL (with --allow-urls), or a file under
    --media-dir."""
    if not isinstance(src, str) or not src:
        raise RequestError(f"{where}: a media source must be a URL, a data: URI or a file name, got {src!r:.60}",
                           param="messages")
    if src.startswith("data:"):
        return src
    if src.startswith(("http://", "https://")):
        if not rules.urls:
            raise RequestError(f"{where}: this server fetches no URLs (start it with --allow-urls); send the media "
                               "as a data: URI instead", HTTPStatus.FORBIDDEN, "messages")
        return src
    if rules.media_dir is None:
        raise RequestError(f"{where}: {src!r:.80} is a local file, and this server reads none (start it with "
                           "--media-dir DIR to allow files under DIR); send the media as a data: URI instead",
                           HTTPStatus.FORBIDDEN, "messages")
    try:
        path = (rules.media_dir / src.removeprefix("file://")).resolve()
        inside = path.is_relative_to(rules.media_dir)
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte, ...
        inside = False
    if not inside:
        raise RequestError(f"{where}: {src!r:.80} is not a file name inside the server's --media-dir",
                           HTTPStatus.FORBIDDEN, "messages")
    return str(path)


# ---- answering ----
class ChatService:
    """The model behind the server: turns a ChatRequest into an Answer. Answers are generated together, up to
    `max_batch_size` at a time (continuous batching: `inference.scheduler`)."""

    def __init__(self, model, processor, *, name: str, device: str, shipped: bool = False, max_batch_size: int = 8,
                 prefill_chunk: int | None = None):
        from .inference.engine import Engine
        from .inference.scheduler import PREFILL_CHUNK, Scheduler

        self.model, self.processor, self.name, self.device, self.shipped = model, processor, name, device, shipped
        self.stops = answer_stop_ids(model, processor)
        self.scheduler = Scheduler(Engine(model, max_batch_size=max_batch_size), stop_token_ids=self.stops,
                                   max_batch_size=max_batch_size,
                                   prefill_chunk=PREFILL_CHUNK if prefill_chunk is None else prefill_chunk)

    def close(self) -> None:
        """Ends the generations in flight (their clients get an error) and the scheduler's thread."""
        self.scheduler.close()

    def prepare(self, req: ChatRequest) -> list["Answer"]:
        """Decodes the media, expands the tokens, checks and queues the generation of the `req.n` answers (a
        ValueError names what is wrong; then nothing is queued). The prompt goes in once for all the answers."""
        from .media import process_vision_info

        if self.shipped:
            from .cli import shipped_video_sizes

            shipped_video_sizes(req.messages)
        media = process_vision_info(req.messages, return_video_kwargs=True)
        input_ids, vision = chat_inputs(self.processor, req.messages, media, self.device)
        tickets = self.scheduler.submit_choices(input_ids, n=req.n, max_new_tokens=req.max_tokens,
                                                sampling=req.sampling, seed=req.seed, logprobs=req.top_logprobs,
                                                **vision)
        return [Answer(self, req, int(input_ids.shape[1]), t) for t in tickets]


def cancel(answers: list["Answer"]) -> None:
    """Frees the rows of the answers (a no-op for those that ended)."""
    for a in answers:
        a.ticket.cancel()


class Answer:
    """One request's answer: iterate `text()` for its pieces; then `finish_reason` and the token counts hold."""

    def __init__(self, service: ChatService, req: ChatRequest, prompt_tokens: int, ticket):
        self.service, self.req, self.ticket = service, req, ticket
        self.prompt_tokens, self.completion_tokens, self.finish_reason = prompt_tokens, 0, "length"
        # OpenAI's logprobs.content entries (with logprobs): (start, end) of each token's text in the answer so far
        # with its entry, until the text up to its end has been handed out; then ready to send
        self._held: list[tuple[int, int, dict]] = []
        self._ready: list[dict] = []

    def take_logprobs(self) -> dict | None:
        """The choice's `logprobs` field: the entries of the tokens whose text has been handed out since the last
        call (None without logprobs). Stream chunks take them after each piece, a whole answer once at its end."""
        if self.req.top_logprobs is None:
            return None
        new, self._ready = self._ready, []
        return {"content": new}

    def _entry(self, k: int, token: int) -> dict:
        """Token k's entry (from the ticket, filled before the token was handed out)."""
        tok = self.service.processor.tokenizer
        lp, top = self.ticket.token_logprobs[k]
        entry = token_entry(tok, token, lp)
        entry["top_logprobs"] = [token_entry(tok, t, v) for t, v in top]
        return entry

    def _release(self, upto: int) -> None:
        """The held entries whose text ends within the first `upto` characters become ready."""
        n = next((j for j, (_, end, _) in enumerate(self._held) if end > upto), len(self._held))
        self._ready += [e for _, _, e in self._held[:n]]
        del self._held[:n]

    def text(self) -> Iterator[str]:
        """The answer as it grows. Closing it early (a client that leaves) cancels the generation. With stop
        strings, the last (longest stop - 1) characters wait until they cannot begin one."""
        stops, req = self.service.stops, self.req
        text = TextStream(self.service.processor.tokenizer)
        held = max((len(s) for s in req.stop), default=1) - 1
        out, sent, cut = "", 0, None
        try:
            for k, token in enumerate(self.ticket):
                self.completion_tokens += 1
                if token in stops:
                    self.finish_reason = "stop"
                    break
                start = len(out)
                out += text.push(token)
                if req.top_logprobs is not None:
                    self._held.append((start, len(out), self._entry(k, token)))
                cut = _first_stop(out, req.stop)
                if cut is not None:
                    self.finish_reason = "stop"
                    break
                if len(out) - held > sent:
                    piece, sent = out[sent:len(out) - held], len(out) - held
                    self._release(sent)
                    yield piece
        finally:
            self.ticket.cancel()  # a no-op once it has ended
        if cut is None:
            full = text.text()  # with what TextStream held back (a revised decoding cannot be unsent: kept as is)
            out = full if full.startswith(out) else out
            cut = _first_stop(out, req.stop)
            if cut is not None:
                self.finish_reason = "stop"
        out = out if cut is None else out[:cut]
        # the tokens of the content: not one that begins after a stop string's cut
        self._ready += [e for start, _, e in self._held if cut is None or start < cut]
        self._held = []
        if len(out) > sent:
            yield out[sent:]


def token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    """OpenAI's {token, logprob, bytes} for one token: its UTF-8 bytes (a byte-level BPE token, as Qwen's, may hold
    part of a character; its text then shows U+FFFD)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    decoder = _byte_decoder(tokenizer)
    if decoder and isinstance(piece, str) and piece and all(c in decoder for c in piece) and \
            int(token_id) not in tokenizer.all_special_ids:
        raw = bytes(decoder[c] for c in piece)
    else:
        raw = tokenizer.decode([int(token_id)]).encode()
    logprob = float(logprob) if math.isfinite(logprob) else -9999.0  # as OpenAI writes an impossible token's
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}


def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """Token character -> byte, for a byte-level BPE tokenizer (None for another kind: tokens are then decoded)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return None
    return _BYTE_LEVEL()


@functools.cache
def _BYTE_LEVEL() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


# ---- HTTP ----
def make_handler(service: ChatService, *, parse_options: dict, max_body_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        server_version = "infinitevl"
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_S  # a client silent this long mid-request (or mid-stream) is dropped

        def log_message(self, fmt, *args):  # one line per request on stderr, as http.server does, minus the noise
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, param: str | None = None) -> None:
            kind = "invalid_request_error" if status < 500 else "server_error"
            self._json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

        def _route(self) -> str:
            return self.path.partition("?")[0].rstrip("/")

        def do_GET(self):
            model = {"id": service.name, "object": "model", "created": 0, "owned_by": "infinitevl"}
            if self._route() == "/health":  # 503 once the model can no longer answer
                st = service.scheduler.status()
                return self._json(503 if st["closed"] else 200, {"status": "down" if st["closed"] else "ok", **st})
            if self._route() == "/v1/models":
                return self._json(200, {"object": "list", "data": [model]})
            if self._route() == f"/v1/models/{service.name}":
                return self._json(200, model)
            if self._route().startswith("/v1/models/"):
                return self._error(404, f"model {self._route()[len('/v1/models/'):]!r} is not served here: this "
                                        f"server serves {service.name!r}", "model")
            self._error(404, f"no such endpoint: GET {self.path:.100} (GET /health, GET /v1/models, "
                             "POST /v1/chat/completions)")

        def do_POST(self):
            if self._route() != "/v1/chat/completions":
                self._drain()
                return self._error(404, f"no such endpoint: POST {self.path:.100} (POST /v1/chat/completions)")
            try:
                req = parse_request(self._body(), served=service.name, **parse_options)
                answer = service.prepare(req)
            except RequestError as e:
                return self._error(e.status, str(e), e.param)
            except ValueError as e:  # bad media, too long, ... named by the library
                return self._error(400, str(e), "messages")
            except Exception as e:  # a bug: say so, keep serving
                traceback.print_exc()
                return self._error(500, f"internal error: {type(e).__name__}: {e}")
            (self._stream if req.stream else self._complete)(answer)

        def _length(self) -> int | None:
            """The body's Content-Length, or None when absent or not a whole number >= 0."""
            text = self.headers.get("Content-Length", "").strip()
            return int(text) if text.isdigit() else None

        def _drain(self) -> None:
            n = self._length()
            if n is not None and n <= max_body_bytes:
                self.rfile.read(n)
            else:
                self.close_connection = True

        def _body(self):
            n = self._length()
            if n is None:
                self.close_connection = True
                raise RequestError("a request body with a Content-Length header (a whole number of bytes) is needed",
                                   HTTPStatus.LENGTH_REQUIRED)
            if n > max_body_bytes:
                self.close_connection = True
                raise RequestError(f"the request body has {n} bytes, above this server's {max_body_bytes} "
                                   "(--max-body-mb): send smaller media", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            raw = self.rfile.read(n)
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON ({e})") from None

        def _client_gone(self) -> bool:
            """The client closed its side of the connection (an end of file waits to be read)."""
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def _head(self, created: int, rid: str) -> dict:
            return {"id": rid, "created": created, "model": service.name}

        def _complete(self, answers: list[Answer]) -> None:
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            contents = []
            try:
                for answer in answers:  # generated together; read one after another
                    parts, pieces = [], answer.text()
                    for piece in pieces:
                        parts.append(piece)
                        if self._client_gone():  # it would never read the answers: free the rows now
                            pieces.close()
                            cancel(answers)
                            self.close_connection = True
                            return
                    contents.append("".join(parts))
            except SchedulerClosed as e:
                cancel(answers)
                return self._error(503, f"{e}: the server is shutting down")
            except ValueError as e:  # the request's own problem, found when its prompt ran
                cancel(answers)
                return self._error(400, str(e), "messages")
            except Exception as e:
                cancel(answers)
                traceback.print_exc()
                return self._error(500, f"internal error: {type(e).__name__}: {e}")
            self._json(200, {**self._head(created, rid), "object": "chat.completion", "choices": [
                {"index": i, "message": {"role": "assistant", "content": content},
                 "finish_reason": answer.finish_reason, "logprobs": answer.take_logprobs()}
                for i, (answer, content) in enumerate(zip(answers, contents))], "usage": _usage(answers)})

        def _stream(self, answers: list[Answer]) -> None:
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            head = {**self._head(created, rid), "object": "chat.completion.chunk"}
            self.close_connection = True

            def send(payload) -> None:
                data = payload if isinstance(payload, str) else json.dumps(payload)
                self.wfile.write(f"data: {data}\n\n".encode())
                self.wfile.flush()

            def chunk(i: int, delta: dict, finish=None, logprobs=None) -> dict:
                return {**head, "choices": [{"index": i, "delta": delta, "finish_reason": finish,
                                             "logprobs": logprobs}]}

            pieces = None
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for i, answer in enumerate(answers):  # generated together; sent one after another
                    pieces = answer.text()
                    send(chunk(i, {"role": "assistant", "content": ""}))
                    for piece in pieces:
                        send(chunk(i, {"content": piece}, logprobs=answer.take_logprobs()))
                    send(chunk(i, {}, answer.finish_reason, logprobs=answer.take_logprobs()))
                if answers[0].req.include_usage:
                    send({**head, "choices": [], "usage": _usage(answers)})
                send("[DONE]")
            except OSError:  # the client left (or went silent past the timeout): free the rows
                if pieces is not None:
                    pieces.close()
                cancel(answers)  # also when it left before a first token (a generator never started)
            except Exception as e:  # the headers are out: report in the stream, as OpenAI does
                if pieces is not None:
                    pieces.close()
                cancel(answers)
                traceback.print_exc()
                try:
                    send({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                    "param": None, "code": 500}})
                except OSError:
                    pass

    return Handler


def _usage(answers: list[Answer]) -> dict:
    """The prompt counts once (it is shared by the choices), the completions of every choice add up."""
    prompt, completion = answers[0].prompt_tokens, sum(a.completion_tokens for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def generation_defaults(model_dir: Path) -> SamplingParams:
    """Sampling for requests that set none: the checkpoint's generation_config.json when it samples, else greedy."""
    try:
        cfg = json.loads((Path(model_dir) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return SamplingParams()
    if not cfg.get("do_sample"):
        return SamplingParams()
    return SamplingParams(float(cfg.get("temperature", 1.0)), int(cfg.get("top_k", 0) or 0),
                          float(cfg.get("top_p", 1.0)))


def serve_main(argv: list[str]) -> int:
    from .cli import DEFAULT_MODEL, HelpFormatter, _device, _dtype, is_shipped, load_model, note_if_shipped

    ap = argparse.ArgumentParser(prog="infinitevl serve", formatter_class=HelpFormatter,
                                 description="Serve the model over HTTP with OpenAI's chat completions API:\n"
                                             "POST /v1/chat/completions (\"stream\": true for server-sent events), "
                                             "GET /v1/models, GET /health.")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="checkpoint directory (default: the small model shipped in the package)")
    ap.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU, float32 on CPU")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    ap.add_argument("--served-model-name", help="the model name clients give (default: the model folder's name)")
    ap.add_argument("--media-dir", type=Path, help="read local media files named in requests from this folder "
                                                   "only (default: no local files; data: URIs and URLs only)")
    ap.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs named in requests (off: only "
                                                               "data: URIs and --media-dir files)")
    ap.add_argument("--allow-special-tokens", action="store_true",
                    help="pass chat-format tokens written in message text (<|im_start|>, <|image_pad|>, ...) through "
                         "as the tokens they are, as vLLM does (default: such a request is refused with a 400)")
    ap.add_argument("--max-batch-size", type=int, default=8, help="requests generated together (more wait)")
    ap.add_argument("--prefill-chunk", type=int,
                    help="prompt tokens fed between two decode steps of the requests in flight (default 2048; "
                         "smaller: their tokens keep coming while a long prompt goes in; larger: faster prefill)")
    ap.add_argument("--max-tokens", type=int, default=512, help="max_tokens of a request that gives none")
    ap.add_argument("--max-tokens-limit", type=int, default=8192, help="the most max_tokens a request may ask")
    ap.add_argument("--max-body-mb", type=float, default=100, help="the largest request body, in MB")
    args = ap.parse_args(argv)
    if not 1 <= args.max_tokens <= args.max_tokens_limit:
        ap.error(f"--max-tokens must be in [1, --max-tokens-limit={args.max_tokens_limit}], got {args.max_tokens}")
    if not 0 <= args.port <= 65535:
        ap.error(f"--port must be in [0, 65535], got {args.port}")
    if args.max_batch_size < 1:
        ap.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        ap.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if not args.max_body_mb > 0:
        ap.error(f"--max-body-mb must be > 0, got {args.max_body_mb}")
    media_dir = None
    if args.media_dir is not None:
        media_dir = args.media_dir.expanduser().resolve()
        if not media_dir.is_dir():
            raise ValueError(f"--media-dir {args.media_dir} is not a folder")
    try:  # the port is checked before the model loads (which may take minutes)
        with socket.create_server((args.host, args.port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}): pick another --port or "
                         "--host") from None
    device = _device(args.device)
    model, processor = load_model(args.model, device, _dtype(args.dtype, device), processor=True)
    note_if_shipped(args.model)
    name = args.served_model_name or Path(args.model).resolve().name
    service = ChatService(model, processor, name=name, device=device, shipped=is_shipped(args.model),
                          max_batch_size=args.max_batch_size, prefill_chunk=args.prefill_chunk)
    server = make_server(service, args.host, args.port, media_dir=media_dir, allow_urls=args.allow_urls,
                         allow_special_tokens=args.allow_special_tokens,
                         default_max_tokens=args.max_tokens,
                         max_tokens_limit=args.max_tokens_limit, max_body_bytes=int(args.max_body_mb * 1e6),
                         defaults=generation_defaults(args.model))
    host, port = server.server_address[:2]
    print(f"serving {name!r} on http://{host}:{port}/v1 (POST /v1/chat/completions; Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        service.close()
    return 0


def make_server(service: ChatService, host: str, port: int, *, media_dir: Path | None = None, allow_urls: bool = False,
                allow_special_tokens: bool = False,
                default_max_tokens: int = 512, max_tokens_limit: int = 8192, max_body_bytes: int = 100_000_000,
                defaults: SamplingParams = SamplingParams()) -> ThreadingHTTPServer:
    """A threaded HTTP server around `service` (call serve_forever; port 0 picks a free port)."""
    if not 1 <= default_max_tokens <= max_tokens_limit:
        raise ValueError(f"the default max_tokens ({default_max_tokens}) must be in [1, max_tokens_limit="
                         f"{max_tokens_limit}]")
    options = dict(defaults=defaults, default_max_tokens=default_max_tokens, max_tokens_limit=max_tokens_limit,
                   rules=MessageRules(None if media_dir is None else Path(media_dir).resolve(), allow_urls,
                                    allow_special_tokens),
                   max_n=service.scheduler.P)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(service, parse_options=options,
                                                                 max_body_bytes=max_body_bytes))
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port} ({e}): pick another --port or --host") from None
    server.daemon_threads = True
    return server
