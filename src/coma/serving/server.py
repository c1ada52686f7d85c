"""``coma serve``: an OpenAI-compatible embedding server (FastAPI + uvicorn) whose concurrent requests share forwards.

Routes:

* ``POST /v1/embeddings``: OpenAI's ``input`` (a string or a list of strings), or vLLM's ``messages`` (one
  conversation, or a list of them) whose user parts give the text and at most one image (``image_url`` with a
  ``data:`` URL) and whose system message is the instruction, exactly as ``Embedder.encode(instruction=...)`` uses it;
* ``GET /v1/models``; ``GET /health`` (with the counts of forwards run and items forwarded);
* ``POST /v1/search``: the top ``k`` hits of one query in the index the server was started with.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with ``param`` naming the field at fault
(``input[3]``, ``messages[0][1].content[0].image_url.url``). Requests are validated and their images decoded before
they are queued, so a bad input never reaches a shared forward; a forward that still fails is retried item by item and
fails only the requests whose items fail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coma.data.formats import drop_orphan_placeholder
from coma.data.images import ImageLoadError, ImageTooLargeError, image_data_url_bytes, load_image_bytes
from coma.embedder import Embedder, EncodeInput

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"
DEFAULT_MAX_IMAGE_BYTES = 20 * 2**20
DEFAULT_MAX_BODY_BYTES = 64 * 2**20
MAX_INPUTS = 2048  # per request, as OpenAI's embeddings API allows
MAX_K = 1000
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    500: "InternalServerError",
}

T = TypeVar("T")
R = TypeVar("R")


class ApiError(StarletteHTTPException):
    """A request refused with an OpenAI-style error body; ``param`` names the field at fault.

    An HTTP exception, so that FastAPI lets it through when it is raised while the body is read (the size limit).
    """

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """OpenAI's error shape, the one every failure of this server answers with."""
    error = {"message": message, "type": _ERROR_TYPES.get(status, "Error"), "param": param, "code": status}
    return JSONResponse({"error": error}, status_code=status)


# ---------------------------------------------------------------------------------------------------------------
# Micro-batching


@dataclass
class _Pending(Generic[T]):
    item: T
    future: Future
    enqueued: float


class MicroBatcher(Generic[T, R]):
    """Runs ``forward`` over items of concurrent requests in shared batches, one batch at a time, on one thread.

    A batch is the oldest waiting item plus whatever else is waiting or arrives until ``max_wait_ms`` after that item
    was queued, up to ``max_batch_size`` items; under load the queue fills during each forward, so batches fill
    without waiting (the default wait is 0).
    ``forward`` maps a list of items to one result per item. When it raises on a batch of several, each item is run
    alone so that only the failing ones fail. The event loop only queues and awaits, so it stays free during forwards.
    """

    def __init__(
        self, forward: Callable[[list[T]], Sequence[R]], max_batch_size: int = 32, max_wait_ms: float = 0.0
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be non-negative, got {max_wait_ms}")
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.SimpleQueue[_Pending[T] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()
        self._failed_forwards = 0

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the batcher is already running")
        self._thread = threading.Thread(target=self._run, name="coma-forward", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail what is still queued, and end the worker (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None and pending.future.set_running_or_notify_cancel():
                pending.future.set_exception(RuntimeError("the server is shutting down"))

    async def submit(self, items: Sequence[T]) -> list[R]:
        """The results of ``items``, in order, once the forwards holding them have run."""
        if self._thread is None:
            raise RuntimeError("the batcher is not running")
        futures: list[Future] = []
        for item in items:
            future: Future = Future()
            self._queue.put(_Pending(item, future, time.monotonic()))
            futures.append(future)
        return list(await asyncio.gather(*(asyncio.wrap_future(future) for future in futures)))

    @property
    def stats(self) -> dict[str, Any]:
        """``forwards`` run, ``items`` forwarded, ``batch_sizes`` (size -> forwards), ``failed_forwards``."""
        with self._lock:
            sizes = dict(self._batch_sizes)
            failed = self._failed_forwards
        return {
            "forwards": sum(sizes.values()),
            "items": sum(size * count for size, count in sizes.items()),
            "batch_sizes": sizes,
            "failed_forwards": failed,
        }

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = [first], False
            deadline = first.enqueued + self.max_wait
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    pending = self._queue.get(block=remaining > 0, timeout=max(remaining, 0.0))
                except queue.Empty:
                    break
                if pending is None:
                    stopping = True
                    break
                batch.append(pending)
            self._run_batch(batch)
            if stopping:
                return

    def _run_batch(self, batch: list[_Pending[T]]) -> None:
        live = [pending for pending in batch if pending.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._forward([pending.item for pending in live])
        except Exception as error:
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            logger.warning("a forward of %d items failed (%r); running them one by one", len(live), error)
            for pending in live:
                try:
                    (result,) = self._forward([pending.item])
                except Exception as item_error:
                    pending.future.set_exception(item_error)
                else:
                    pending.future.set_result(result)
            return
        for pending, result in zip(live, results, strict=True):
            pending.future.set_result(result)

    def _forward(self, items: list[T]) -> Sequence[R]:
        try:
            results = self.forward(items)
            if len(results) != len(items):
                raise RuntimeError(f"the forward returned {len(results)} results for {len(items)} items")
        except Exception:
            with self._lock:
                self._failed_forwards += 1
            raise
        with self._lock:
            self._batch_sizes[len(items)] += 1
        return results


# ---------------------------------------------------------------------------------------------------------------
# Requests


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do (clients send extras such as ``user``).
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Body):
    """OpenAI's embeddings request, plus vLLM's ``messages``; ``input`` and ``messages`` are checked by hand so that
    errors name the exact element at fault."""

    model: StrictStr | None = None
    input: Any = None
    messages: Any = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class SearchRequest(_Body):
    """One query (text ``input``, or one conversation in ``messages``) and the number of hits wanted."""

    model: StrictStr | None = None
    input: Any = None
    messages: Any = None
    k: StrictInt = Field(10, ge=1, le=MAX_K)


@dataclass(frozen=True)
class _Item:
    """An input ready for the forward, and the request field it came from (for errors)."""

    input: EncodeInput
    param: str


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def with_instruction(text: str, instruction: str | None) -> str:
    """The text after the instruction, laid out exactly as ``Embedder.encode(instruction=...)`` lays it out.

    The server formats per item because one shared forward mixes requests with different instructions.
    """
    if not instruction:
        return text
    return f"{instruction}\n{text}" if text else instruction


class EmbeddingService:
    """Validation of requests into model inputs, the shared forward, and the index, behind the routes."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        served_model_name: str,
        index: Any = None,
        max_batch_size: int = 32,
        max_wait_ms: float = 0.0,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_input_tokens: int | None = None,
    ) -> None:
        self.embedder = embedder
        self.served_model_name = served_model_name
        self.max_image_bytes = max_image_bytes
        self.max_input_tokens = (
            max_input_tokens if max_input_tokens is not None else _context_length(embedder)
        )
        self.placeholder = embedder.config.image_placeholder
        # Validation counts tokens on request threads while the worker tokenizes batches with padding on: a private
        # copy (and a lock) keeps the two from sharing one tokenizer's mutable state.
        self._tokenizer = copy.deepcopy(embedder.processor.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self.created = int(time.time())
        self.dim = int(self._forward([EncodeInput(text="warm-up")])[0][0].shape[0])
        if index is not None and index.dim != self.dim:
            raise ValueError(
                f"the index holds {index.dim}-dimensional vectors but {served_model_name} embeds into {self.dim} "
                "dimensions; build the index with this model"
            )
        self.index = index
        self.batcher: MicroBatcher[EncodeInput, tuple[np.ndarray, int]] = MicroBatcher(
            self._forward, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms
        )

    # the forward

    @torch.inference_mode()
    def _forward(self, items: list[EncodeInput]) -> list[tuple[np.ndarray, int]]:
        """One batch through the model, as one batch of ``Embedder.encode`` runs; with each row's prompt tokens."""
        embedder = self.embedder
        batch = embedder.collate(items)
        tokens = batch["attention_mask"].sum(dim=1).tolist()
        batch = {key: value.to(embedder.device) for key, value in batch.items()}
        embeddings = embedder.model(batch).float().cpu().numpy()
        return list(zip(embeddings, tokens, strict=True))

    async def embed(self, items: list[_Item]) -> list[tuple[np.ndarray, int]]:
        try:
            return await self.batcher.submit([item.input for item in items])
        except Exception as error:
            logger.exception("a forward failed")
            raise ApiError(500, f"the model failed on this request: {error!r}") from None

    # validation

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.served_model_name!r}",
                "model",
            )

    def embedding_items(self, body: EmbeddingRequest) -> list[_Item]:
        """The request's inputs ready for the forward (images decoded); raises :class:`ApiError` naming the field."""
        if body.dimensions is not None and body.dimensions != self.dim:
            raise ApiError(
                400,
                f"dimensions={body.dimensions} is not supported: {self.served_model_name} embeds into {self.dim} "
                "dimensions (leave 'dimensions' out)",
                "dimensions",
            )
        if (body.input is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of 'input' (texts) and 'messages' (conversations)", "input")
        if body.input is not None:
            items = self._text_items(body.input)
        else:
            items = [self._conversation(messages, path) for messages, path in _conversations(body.messages)]
        self._check_items(items)
        return items

    def search_item(self, body: SearchRequest) -> _Item:
        if (body.input is None) == (body.messages is None):
            raise ApiError(
                400, "send exactly one of 'input' (a text) and 'messages' (a conversation)", "input"
            )
        if body.input is not None:
            if not isinstance(body.input, str):
                raise ApiError(
                    400, f"'input' must be a string (one query), got {_type_name(body.input)}", "input"
                )
            (item,) = self._text_items(body.input)
        else:
            conversations = _conversations(body.messages)
            if conversations[0][1] != "messages":
                raise ApiError(
                    400, "search takes one conversation (a list of messages), not a batch", "messages"
                )
            item = self._conversation(*conversations[0])
        self._check_items([item])
        return item

    def _text_items(self, value: Any) -> list[_Item]:
        if isinstance(value, str):
            texts = [(value, "input")]
        elif isinstance(value, list):
            if not value:
                raise ApiError(400, "'input' is an empty list; send at least one text", "input")
            if len(value) > MAX_INPUTS:
                raise ApiError(
                    400, f"'input' holds {len(value)} texts, above the limit of {MAX_INPUTS}", "input"
                )
            if all(_is_int(x) for x in value) or all(
                isinstance(x, list) and all(map(_is_int, x)) for x in value
            ):
                raise ApiError(400, "token-id inputs are not supported; send texts", "input")
            texts = [(text, f"input[{i}]") for i, text in enumerate(value)]
        else:
            raise ApiError(
                400, f"'input' must be a string or a list of strings, got {_type_name(value)}", "input"
            )
        for text, param in texts:
            if not isinstance(text, str):
                raise ApiError(400, f"{param} must be a string, got {_type_name(text)}", param)
            if not text:
                raise ApiError(400, f"{param} is an empty string", param)
        return [_Item(EncodeInput(text=text), param) for text, param in texts]

    def _conversation(self, messages: Any, path: str) -> _Item:
        """One conversation as one input: system text is the instruction, user parts the text and the image."""
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, f"{path} must be a non-empty list of messages", path)
        instructions, texts, urls = [], [], []
        for i, message in enumerate(messages):
            where = f"{path}[{i}]"
            if not isinstance(message, dict):
                raise ApiError(400, f"{where} must be an object with 'role' and 'content'", where)
            role = message.get("role")
            if role not in ("system", "user"):
                problem = (
                    f"{where}.role must be 'system' or 'user' (an embedding has no other turns), got {role!r}"
                )
                raise ApiError(400, problem, f"{where}.role")
            for kind, value, param in _content_parts(message.get("content"), f"{where}.content"):
                if kind == "image_url":
                    if role == "system":
                        raise ApiError(400, "a system message holds text only (the instruction)", param)
                    urls.append((value, param))
                elif value:
                    (instructions if role == "system" else texts).append(value)
        if len(urls) > 1:
            raise ApiError(400, f"one image per conversation; {path} holds {len(urls)}", urls[1][1])
        if not texts and not urls:
            raise ApiError(400, f"{path} has no user text or image", path)
        image = self._decode_image(*urls[0]) if urls else None
        # Parts are concatenated as the exported chat template concatenates them, so that this server and vLLM
        # serving the exported folder embed one conversation alike. As encode does, a text-only input loses its
        # image placeholder before the instruction goes in front.
        text, _ = drop_orphan_placeholder("".join(texts), image is not None, self.placeholder)
        text = with_instruction(text, "".join(instructions) or None)
        return _Item(EncodeInput(text=text, image=image), path)

    def _decode_image(self, url: str, param: str) -> Image.Image:
        if not url.lower().startswith("data:"):
            problem = f"only data: URLs are accepted (data:image/png;base64,...), not {url[:40]!r}"
            raise ApiError(400, f"{problem}; the server does not fetch http(s) or file URLs", param)
        try:
            data = image_data_url_bytes(url, self.max_image_bytes)
        except ImageTooLargeError as error:
            raise ApiError(413, f"{param}: {error} (--max-image-bytes)", param) from None
        except ImageLoadError as error:
            raise ApiError(400, f"{param}: {error}", param) from None
        try:
            return load_image_bytes(data, name=param)
        except ImageLoadError as error:  # its message names the image by ``param``
            raise ApiError(400, str(error), param) from None

    def _check_items(self, items: list[_Item]) -> None:
        """Refuse inputs the forward would fail on (two image places) or that are too long for the model."""
        for item in items:
            count = item.input.text.count(self.placeholder)
            if item.input.image is not None and count > 1:
                message = (
                    f"{item.param} has {count} image placeholders {self.placeholder!r}; one image per input"
                )
                raise ApiError(400, message, item.param)
        if self.max_input_tokens is None:
            return
        with self._tokenizer_lock:
            ids = self._tokenizer([item.input.text for item in items], add_special_tokens=False)["input_ids"]
        for item, row in zip(items, ids, strict=True):
            if len(row) > self.max_input_tokens:
                message = (
                    f"{item.param} has {len(row):,} text tokens, above the limit of {self.max_input_tokens:,}"
                )
                raise ApiError(400, message, item.param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _conversations(value: Any) -> list[tuple[Any, str]]:
    """``messages`` as ``(conversation, path)`` pairs: one conversation, or a list of them (a batch)."""
    if not isinstance(value, list) or not value:
        raise ApiError(
            400,
            "'messages' must be a non-empty list of messages, or a list of such lists (a batch)",
            "messages",
        )
    if not isinstance(value[0], list):
        return [(value, "messages")]
    if len(value) > MAX_INPUTS:
        raise ApiError(
            400, f"'messages' holds {len(value)} conversations, above the limit of {MAX_INPUTS}", "messages"
        )
    return [(messages, f"messages[{i}]") for i, messages in enumerate(value)]


def _content_parts(content: Any, path: str) -> Iterator[tuple[str, str, str]]:
    """``(kind, value, param)`` for each part of a message's content: ``("text", text, ...)`` or
    ``("image_url", url, ...)``."""
    if isinstance(content, str):
        yield "text", content, path
        return
    if not isinstance(content, list):
        raise ApiError(400, f"{path} must be a string or a list of parts, got {_type_name(content)}", path)
    for j, part in enumerate(content):
        where = f"{path}[{j}]"
        if not isinstance(part, dict):
            raise ApiError(400, f"{where} must be an object with a 'type'", where)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"{where}.text must be a string, got {_type_name(text)}", f"{where}.text")
            yield "text", text, f"{where}.text"
        elif kind == "image_url":
            image_url = part.get("image_url")
            if isinstance(image_url, dict):
                url, param = image_url.get("url"), f"{where}.image_url.url"
            else:
                url, param = image_url, f"{where}.image_url"
            if not isinstance(url, str):
                raise ApiError(400, f"{param} must be a string (a data: URL), got {_type_name(url)}", param)
            yield "image_url", url, param
        else:
            raise ApiError(400, f"{where}.type must be 'text' or 'image_url', got {kind!r}", f"{where}.type")


def _context_length(embedder: Embedder) -> int | None:
    """The language model's context length, which bounds an input's text tokens."""
    config = embedder.model.backbone.config
    text_config = getattr(config, "text_config", None) or config
    return getattr(text_config, "max_position_embeddings", None)


class BodyLimit:
    """Refuse request bodies above ``max_bytes`` with a 413 in the server's error shape.

    A declared ``Content-Length`` is refused before anything is read; a chunked body when its bytes pass the limit.
    (FastAPI's own ``max_body_size`` answers a declared length with a plain-text 413, whatever the app sends.)
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body is above the limit of {self.max_bytes:,} bytes"
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.max_bytes:
                    raise ApiError(413, message)
            return event

        await self.app(scope, limited, send)


def _validation_error(error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors (malformed JSON, a field of the wrong type) in OpenAI's error shape."""
    first = error.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "JSON decode error")
        return error_response(400, f"the request body is not valid JSON: {detail}")
    if not loc or not isinstance(loc[0], str):
        return error_response(400, "the request body must be a JSON object (Content-Type: application/json)")
    param = loc[0] + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:])
    return error_response(400, f"{param}: {first.get('msg', 'invalid value')}", param)


# ---------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    embedder: Embedder,
    *,
    served_model_name: str,
    index: Any = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 0.0,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_input_tokens: int | None = None,
) -> FastAPI:
    """The server's ASGI app; the batcher's worker runs while the app is served (its lifespan).

    ``index`` is a :class:`coma.serving.index.Index` of the same embedding dimension, or None (no ``/v1/search``).
    ``max_batch_size=1`` turns batching off: each item is a forward of its own. ``max_input_tokens`` defaults to the
    model's context length. ``app.state.service.batcher.stats`` counts forwards and batch sizes.
    """
    service = EmbeddingService(
        embedder,
        served_model_name=served_model_name,
        index=index,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_image_bytes=max_image_bytes,
        max_input_tokens=max_input_tokens,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        try:
            yield
        finally:
            service.batcher.stop()

    app = FastAPI(title="coma", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), error.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.url.path!r}" if error.status_code == 404 else str(error.detail)
        return error_response(error.status_code, message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal server error: {error!r}")

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = service.batcher.stats
        return JSONResponse({"status": "ok", "forwards": stats["forwards"], "items": stats["items"]})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": served_model_name, "object": "model", "created": service.created, "owned_by": "coma"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        service.check_model(body.model)
        items = await run_in_threadpool(service.embedding_items, body)
        results = await service.embed(items)
        data = [
            {"object": "embedding", "index": i, "embedding": _encode_vector(vector, body.encoding_format)}
            for i, (vector, _) in enumerate(results)
        ]
        tokens = int(sum(count for _, count in results))
        reply = {
            "id": f"embd-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": served_model_name,
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JSONResponse(reply)

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> JSONResponse:
        if service.index is None:
            raise ApiError(404, "no index is loaded: start coma serve with --index INDEX_DIR to search")
        service.check_model(body.model)
        item = await run_in_threadpool(service.search_item, body)
        ((vector, _),) = await service.embed([item])
        (hits,) = await run_in_threadpool(service.index.search, vector[None, :], body.k)
        data = [
            {"rank": int(hit.rank), "score": float(hit.score), "id": hit.id, "text": hit.text,
             "image": hit.image, "source": hit.source}
            for hit in hits
        ]  # fmt: skip
        return JSONResponse({"object": "list", "model": served_model_name, "data": data})

    return app


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@contextlib.contextmanager
def serve_in_thread(
    app: FastAPI, host: str = HOST, port: int = 0, log_level: str = "warning", timeout: float = 30.0
) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a background thread (tests, benchmarks); yields the base URL ``http://HOST:PORT``.

    Port 0 lets the OS choose a free port.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    thread = threading.Thread(target=server.run, name="coma-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout)
            raise RuntimeError(f"the server did not start on {host}:{port} (see its log)")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout)


__all__ = [
    "ApiError",
    "EmbeddingRequest",
    "EmbeddingService",
    "MicroBatcher",
    "SearchRequest",
    "create_app",
    "error_response",
    "serve_in_thread",
    "with_instruction",
]
