"""A scripted teacher: an OpenAI-compatible chat-completions server on loopback that answers from a script.

It stands in for a teacher VLM served by vLLM (``/v1/models``, ``/v1/chat/completions``) in the offline demo and in
tests of ``coma generate``. Each scripted image has a list of ``(question, answer)`` pairs; a request is recognised
by the image in its first user message (the client re-encodes and resizes images, so they are matched by nearest
thumbnail, not by bytes) and by the shape of the conversation:

* **questions**: a single user turn whose text contains ``"numbered list"``: the reply is ``"1. Q1\\n2. Q2..."``;
* **caption**: a single user turn without that marker: ``captions[image]`` if given, else the first answer (or, when
  the text is itself a scripted question of that image, its answer);
* **answer**: a longer conversation: the reply is the scripted answer to the text of the last user message.

Faults (server errors, 429 with ``Retry-After``, slow replies, malformed replies, dropped connections) are injected
with seeded, reproducible draws: the i-th chat-completions request always gets the i-th draw. Only the standard
library serves HTTP; only ``127.0.0.1`` is ever bound.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import hashlib
import hmac
import io
import json
import math
import random
import re
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from coma.data.images import ImageLoadError, load_image, resolve_image_path

HOST = "127.0.0.1"
QUESTIONS_MARKER = "numbered list"
THUMBNAIL_SIZE = 16
# Mean absolute difference (pixel values on a 0..1 scale) between a request's thumbnail and the nearest scripted one
# above which the image is "unknown". Measured on 180 synthetic scenes (with one-object edits and re-renders): copies
# resized to 56-448 px and JPEG re-encoded (quality 30-90) stay below 0.02, even 28 px at JPEG quality 10-20 below
# 0.045; random block images (2x2 to 8x8 random colours, 3000 of them) are at least 0.085 away, 0.16 for all but one.
# (A flat single-colour image can come as close as 0.02 to a dark scene: no pixel threshold separates those.)
MAX_THUMBNAIL_DISTANCE = 0.06
IMAGE_PROMPT_TOKENS = 256  # a constant stand-in for the visual tokens of one image in ``usage.prompt_tokens``
MAX_BODY_BYTES = 64 * 1024 * 1024
IDLE_CONNECTION_TIMEOUT = 60.0
FAULT_KINDS = ("drop", "error", "rate_limit", "slow", "malformed")
ERROR_STATUSES = (500, 502, 503)
MALFORMED_QUESTION_KINDS = ("prose", "too_few", "duplicate", "no_question_mark")
_STATUS_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class Faults:
    """Fault-injection rates in [0, 1] for chat-completions requests, drawn per request from a seeded RNG.

    The kinds are exclusive (one draw picks at most one), so the rates must sum to at most 1:

    * ``error_rate``: answer 500, 502 or 503 with a JSON error body;
    * ``rate_limit_rate``: answer 429 with ``Retry-After: <retry_after>`` (seconds, possibly fractional);
    * ``slow_rate``: sleep ``slow_seconds`` before answering normally (to exceed a client's timeout);
    * ``malformed_rate``: a questions reply that is not a valid numbered list (prose, two items, a duplicate, or a
      line without "?"); any other reply has empty content;
    * ``drop_rate``: close the connection without sending any response.
    """

    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    retry_after: float = 0.05
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    malformed_rate: float = 0.0
    drop_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = self._rates()
        for name, rate in rates.items():
            if not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
                raise ValueError(f"fault rate {name}_rate must be in [0, 1], got {rate!r}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(
                f"fault rates are exclusive and must sum to at most 1, got {sum(rates.values()):g}"
            )
        for name in ("retry_after", "slow_seconds"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number of seconds, got {value!r}")

    def _rates(self) -> dict[str, float]:
        return {
            "drop": self.drop_rate,
            "error": self.error_rate,
            "rate_limit": self.rate_limit_rate,
            "slow": self.slow_rate,
            "malformed": self.malformed_rate,
        }

    def pick(self, u: float) -> str | None:
        """The fault kind a uniform draw ``u`` in [0, 1) falls on, or None for a normal reply."""
        edge = 0.0
        for kind, rate in self._rates().items():
            edge += rate
            if u < edge:
                return kind
        return None


class _RequestError(Exception):
    """A request the teacher refuses with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, error_type: str = "BadRequestError", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.extra = extra


def _thumbnail(image: Image.Image, size: int) -> np.ndarray:
    small = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(small, dtype=np.float32).reshape(-1) / 255.0


def _normalise_question(text: str) -> str:
    return " ".join(text.split()).casefold()


def _word_count(text: str) -> int:
    return len(text.split())


def _truncate_words(text: str, max_words: int) -> str:
    """The text up to the end of its ``max_words``-th word (line breaks kept)."""
    for index, match in enumerate(re.finditer(r"\S+", text)):
        if index + 1 == max_words:
            return text[: match.end()]
    return text


def _message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def _message_images(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise _RequestError(400, "an image_url part has no url")
            urls.append(url)
    return urls


def _decode_data_url(url: str) -> bytes:
    match = re.match(r"data:(image/[A-Za-z0-9.+-]+)?(;[^,]*)?,", url)
    if match is None:
        raise _RequestError(400, "only data:image/...;base64 URLs are supported by the scripted teacher")
    if ";base64" not in (match.group(2) or ""):
        raise _RequestError(400, "the image data URL is not base64-encoded")
    try:
        return base64.b64decode(url[match.end() :])
    except (binascii.Error, ValueError) as error:
        raise _RequestError(400, f"cannot decode the image data URL: {error}") from None


def _decode_image(raw: bytes) -> Image.Image:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return load_image(image)
    except (
        ImageLoadError,
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        ValueError,
    ) as error:
        raise _RequestError(400, f"cannot read the image: {error}") from None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # The default listen backlog of 5 resets connections when a client opens dozens at once (--concurrency 64).
    request_queue_size = 256

    def __init__(self, teacher: ScriptedTeacher) -> None:
        self.teacher = teacher
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((HOST, 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet: no tracebacks on stderr
        self.teacher._count("handler_errors")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ScriptedTeacher/1.0"
    sys_version = ""
    timeout = IDLE_CONNECTION_TIMEOUT
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """Quiet: no request logging."""

    def do_GET(self) -> None:
        teacher = self.server.teacher
        teacher._count("requests")
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check_auth()
            if path == "/v1/models":
                created = int(teacher._created)
                model = {"id": teacher.model, "object": "model", "created": created, "owned_by": "coma"}
                self._send_json(200, {"object": "list", "data": [model]})
            elif path == "/v1/chat/completions":
                raise _RequestError(405, "method not allowed; use POST", "MethodNotAllowed")
            else:
                raise _RequestError(404, f"no route {path!r}", "NotFoundError")
        except _RequestError as error:
            self._send_error(error)

    def do_POST(self) -> None:
        teacher = self.server.teacher
        teacher._count("requests")
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            body = self._read_body()
            if path != "/v1/chat/completions":
                raise _RequestError(404, f"no route {path!r}", "NotFoundError")
            fault, sub = teacher._draw()
            self._check_auth()
            if fault == "drop":
                teacher._count_fault("drop")
                self.close_connection = True
                return
            if fault == "error":
                status = ERROR_STATUSES[min(int(sub * len(ERROR_STATUSES)), len(ERROR_STATUSES) - 1)]
                teacher._count_fault("error")
                message = f"injected fault: {_STATUS_REASONS[status]}"
                self._send_error(_RequestError(status, message, "InternalServerError"), fault="error")
                return
            if fault == "rate_limit":
                teacher._count_fault("rate_limit")
                retry_after = f"{teacher.faults.retry_after:g}"
                error = _RequestError(
                    429, "injected fault: rate limit reached, retry later", "RateLimitError"
                )
                self._send_error(error, headers={"Retry-After": retry_after}, fault="rate_limit")
                return
            if fault == "slow":
                teacher._count_fault("slow")
                if teacher._stopping.wait(teacher.faults.slow_seconds):
                    self.close_connection = True
                    return
            reply, fault_header = teacher._complete(body, malformed=fault == "malformed", sub=sub)
            if fault == "slow":
                fault_header = "slow"
            self._send_json(200, reply, fault=fault_header)
        except _RequestError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a bug in the teacher still answers, as a 500 the client can read
            teacher._count("handler_errors")
            self._send_error(_RequestError(500, f"scripted teacher error: {error!r}", "InternalServerError"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise _RequestError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise _RequestError(400, "invalid Content-Length") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise _RequestError(413, f"request body of {length} bytes is above the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length) if length else b""

    def _check_auth(self) -> None:
        key = self.server.teacher.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {key}".encode()):
            raise _RequestError(
                401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key"
            )

    def _send_error(
        self, error: _RequestError, headers: Mapping[str, str] | None = None, fault: str | None = None
    ) -> None:
        body = {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": error.extra.get("param"),
                "code": error.extra.get("code", error.status),
            }
        }
        self._send_json(error.status, body, headers=headers, fault=fault)

    def _send_json(
        self,
        status: int,
        payload: Any,
        headers: Mapping[str, str] | None = None,
        fault: str | None = None,
    ) -> None:
        extra = dict(headers or {})
        if fault is not None:
            extra["X-Scripted-Fault"] = fault
        self._send(status, json.dumps(payload).encode(), headers=extra)

    def _send(self, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        self.server.teacher._count_status(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


class ScriptedTeacher:
    """An OpenAI-compatible chat-completions server on ``127.0.0.1`` that answers questions about images from a script.

    ``script`` maps image paths (relative to ``image_root``) to ``[(question, answer), ...]``; ``captions`` optionally
    maps some of those images to a caption. Use :meth:`start` / :meth:`stop`, or ``with teacher as base_url:``.
    """

    def __init__(
        self,
        script: Mapping[str, Sequence[tuple[str, str]]],
        image_root: str | Path,
        *,
        model: str = "scripted-teacher",
        api_key: str | None = None,
        faults: Faults | None = None,
        captions: Mapping[str, str] | None = None,
        thumbnail_size: int = THUMBNAIL_SIZE,
        max_distance: float = MAX_THUMBNAIL_DISTANCE,
    ) -> None:
        if not script:
            raise ValueError("the script has no images")
        captions = dict(captions or {})
        unknown = sorted(set(captions) - set(script))
        if unknown:
            raise ValueError(f"captions for images not in the script: {unknown[:5]}")
        self.image_root = Path(image_root)
        self.model = model
        self.api_key = api_key
        self.faults = faults if faults is not None else Faults()
        self.thumbnail_size = thumbnail_size
        self.max_distance = max_distance
        self.script: dict[str, list[tuple[str, str]]] = {}
        self._answers: dict[str, dict[str, str]] = {}
        for image, pairs in script.items():
            pairs = [(str(q), str(a)) for q, a in pairs]
            if not pairs:
                raise ValueError(f"the script of {image!r} has no questions")
            answers: dict[str, str] = {}
            for question, answer in pairs:
                key = _normalise_question(question)
                if not key or "\n" in question.strip():
                    raise ValueError(
                        f"the script of {image!r} has an empty or multi-line question: {question!r}"
                    )
                if key in answers:
                    raise ValueError(f"the script of {image!r} repeats the question {question!r}")
                answers[key] = answer
            self.script[image] = pairs
            self._answers[image] = answers
        self.captions = captions
        self._keys = list(self.script)
        thumbs, self._digests = [], {}
        for image in self._keys:
            path = resolve_image_path(image, self.image_root)
            thumbs.append(_thumbnail(load_image(path), thumbnail_size))
            self._digests.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), image)
        self._thumbs = np.stack(thumbs)
        self._lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        self._stats: dict[str, Any] = {
            "requests": 0,
            "status": {},
            "faults": dict.fromkeys(FAULT_KINDS, 0),
            "kinds": {"questions": 0, "caption": 0, "answer": 0},
            "handler_errors": 0,
        }
        self._created = time.time()
        self._completion_id = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.base_url: str | None = None

    # lifecycle

    def start(self) -> str:
        """Serve on ``127.0.0.1`` on a free port chosen by the OS; returns the base URL ``http://127.0.0.1:PORT/v1``."""
        if self._server is not None:
            raise RuntimeError(f"the scripted teacher is already serving at {self.base_url}")
        self._stopping.clear()
        server = _Server(self)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.name = f"scripted-teacher-{server.server_address[1]}"
        thread.start()
        self._server, self._thread = server, thread
        self.base_url = f"http://{HOST}:{server.server_address[1]}/v1"
        return self.base_url

    def stop(self) -> None:
        """Stop serving, close open connections and free the port (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with server.connections_lock:
            connections = list(server.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None
        self.base_url = None

    def __enter__(self) -> str:
        """Start serving; ``with ScriptedTeacher(...) as url:`` binds the base URL, as :meth:`start` returns it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int | None:
        """The port served on, or None when stopped."""
        return None if self._server is None else int(self._server.server_address[1])

    # counters

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters: ``requests``, ``status`` (by code), ``faults`` (by kind), ``kinds`` (questions,
        caption, answer replies) and ``handler_errors``."""
        with self._lock:
            return copy.deepcopy(self._stats)

    def _count(self, name: str) -> None:
        with self._lock:
            self._stats[name] += 1

    def _count_status(self, status: int) -> None:
        with self._lock:
            self._stats["status"][status] = self._stats["status"].get(status, 0) + 1

    def _count_fault(self, kind: str) -> None:
        with self._lock:
            self._stats["faults"][kind] += 1

    def _draw(self) -> tuple[str | None, float]:
        """Two uniform draws per request (fault kind, then its variant), so the sequence depends only on the order."""
        with self._lock:
            u, sub = self._rng.random(), self._rng.random()
        return self.faults.pick(u), sub

    # recognition and replies

    def recognise(self, image: Image.Image, raw: bytes | None = None) -> list[tuple[str, float]]:
        """Scripted images within ``max_distance`` of ``image``, nearest (L2 over thumbnails) first, with their mean
        absolute thumbnail difference; an exact byte copy of a scripted file comes first with distance 0."""
        if raw is not None:
            exact = self._digests.get(hashlib.sha256(raw).hexdigest())
            if exact is not None:
                return [(exact, 0.0)]
        diff = self._thumbs - _thumbnail(image, self.thumbnail_size)[None, :]
        l2 = np.sqrt(np.square(diff).sum(axis=1))
        mad = np.abs(diff).mean(axis=1)
        order = np.argsort(l2, kind="stable")
        return [(self._keys[i], float(mad[i])) for i in order if mad[i] <= self.max_distance]

    def _complete(self, body: bytes, *, malformed: bool, sub: float) -> tuple[dict[str, Any], str | None]:
        try:
            request = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _RequestError(400, f"the request body is not valid JSON: {error}") from None
        if not isinstance(request, dict):
            raise _RequestError(400, "the request body must be a JSON object")
        model = request.get("model", self.model)
        if model != self.model:
            raise _RequestError(404, f"The model `{model}` does not exist.", "NotFoundError", param="model")
        if request.get("stream"):
            raise _RequestError(400, "streaming is not supported by the scripted teacher")
        max_tokens = request.get("max_tokens", request.get("max_completion_tokens"))
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            raise _RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}")
        temperature = request.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, (int, float))
        ):
            raise _RequestError(400, f"temperature must be a number, got {temperature!r}")
        messages = request.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _RequestError(400, "the request has no messages")
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise _RequestError(400, f"invalid message: {str(message)[:200]}")
            if not isinstance(message.get("content"), (str, list)):
                raise _RequestError(400, f"a {message['role']} message has no content")
        turns = [m for m in messages if m["role"] != "system"]
        if not turns or turns[0]["role"] != "user":
            raise _RequestError(400, "the first message must be a user message with the image")
        if turns[-1]["role"] != "user":
            raise _RequestError(400, "the last message must be a user message")
        urls = _message_images(turns[0]["content"])
        if len(urls) != 1:
            raise _RequestError(
                400, f"the first user message must hold exactly one image, it holds {len(urls)}"
            )
        if any(_message_images(m["content"]) for m in messages if m is not turns[0]):
            raise _RequestError(400, "only the first user message may hold an image")
        raw = _decode_data_url(urls[0])
        candidates = self.recognise(_decode_image(raw), raw)
        if not candidates:
            raise _RequestError(400, "unknown image: it matches no image of the script")
        image = candidates[0][0]
        text = _message_text(turns[-1]["content"]).strip()
        fault_header = None
        if len(turns) == 1 and QUESTIONS_MARKER in text.casefold():
            kind = "questions"
            if malformed:
                content, fault_header = self._malformed_questions(image, sub)
            else:
                content = "\n".join(f"{i}. {q}" for i, (q, _) in enumerate(self.script[image], 1))
        else:
            if len(turns) == 1 and _normalise_question(text) not in self._answers[image]:
                kind = "caption"
                content = self.captions.get(image, self.script[image][0][1])
            else:
                kind = "answer"
                content = self._answer(candidates, text)
            if malformed:
                content, fault_header = "", "malformed-empty"
        finish_reason = "stop"
        if max_tokens is not None and _word_count(content) > max_tokens:
            content, finish_reason = _truncate_words(content, max_tokens), "length"
        prompt_tokens = IMAGE_PROMPT_TOKENS + sum(_word_count(_message_text(m["content"])) for m in messages)
        completion_tokens = _word_count(content)
        with self._lock:
            self._completion_id += 1
            completion_id = self._completion_id
            self._stats["kinds"][kind] += 1
            if malformed:
                self._stats["faults"]["malformed"] += 1
        reply = {
            "id": f"chatcmpl-{completion_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return reply, fault_header

    def _answer(self, candidates: list[tuple[str, float]], question: str) -> str:
        key = _normalise_question(question)
        # Nearest image first; near-identical scripted images fall through to the one whose script has the question.
        for image, _ in candidates:
            answer = self._answers[image].get(key)
            if answer is not None:
                return answer
        raise _RequestError(400, f"question not in the script of {candidates[0][0]!r}: {question[:200]!r}")

    def _malformed_questions(self, image: str, sub: float) -> tuple[str, str]:
        questions = [q for q, _ in self.script[image]]
        kind = MALFORMED_QUESTION_KINDS[min(int(sub * len(MALFORMED_QUESTION_KINDS)), 3)]
        if kind == "prose":
            text = (
                "Here are some things you could ask: "
                + " Also, ".join(q.rstrip("?") for q in questions)
                + "."
            )
        elif kind == "too_few":
            text = "\n".join(f"{i}. {q}" for i, q in enumerate(questions[:2], 1))
        elif kind == "duplicate":
            listed = [questions[0], *questions[:2]] if len(questions) > 1 else questions * 3
            text = "\n".join(f"{i}. {q}" for i, q in enumerate(listed, 1))
        else:
            listed = [*questions[:2], "The image shows a scene"]
            text = "\n".join(f"{i}. {q}" for i, q in enumerate(listed, 1))
        return text, f"malformed-{kind}"
