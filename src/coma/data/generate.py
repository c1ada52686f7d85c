"""Stage-1 data from a teacher VLM behind an OpenAI-compatible chat-completions server (``coma generate``).

For each image the teacher first writes 3-5 retrieval-oriented questions (a numbered list, parsed strictly), then
answers them one by one in a single growing multi-turn chat that carries the image in its first turn, as the
paper's data was made (DESIGN §2.2). Each finished conversation is appended to the output as one LLaVA-style
JSONL record (what ``coma compress`` reads) and flushed, so a killed run loses only the requests in flight and a
re-run of the same command continues with the images not yet done. Images that keep failing go to
``OUT.rejects.jsonl`` with the reason; ``OUT.meta.json`` records the teacher, prompts, settings, counts and tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from coma.data.formats import IMAGE_TOKEN, read_mmeb_train_subset
from coma.data.images import ImageLoadError, list_image_files, load_image
from coma.io import write_json

PROMPT_VERSION = "coma-teacher-v1"
# Our words for the release's question prompt (coma-paper-and-release §2.6): retrieval-oriented, image-grounded.
QUESTION_PROMPT = (
    "Look carefully at this image. Write {low} to {high} specific questions whose answers capture its most "
    "important visual content, so that the image could be found again from them: the main objects and their "
    "attributes (type, colour, position), the scene (kind of place, time of day, weather), any visible text or "
    "logos, and how the elements relate. Every question must be answerable from the image alone, cover a "
    "different element, and avoid opinions. Reply with a numbered list only, one question per line, each "
    "ending with a question mark."
)
# The caption ablation's prompts, one drawn per image by the seed.
CAPTION_PROMPTS = (
    "Describe this image in one sentence.",
    "Write a short caption for this image.",
    "Summarise what this image shows in a sentence.",
    "Give a brief description of the image.",
    "What does this image show? Answer in one sentence.",
    "Caption this image.",
    "Describe the main content of this picture briefly.",
)
# The 12 MMEB-train subsets the paper's stage 1 drew its images from (coma-paper-and-release §2.6).
PAPER_SUBSETS = ("N24News", "HatefulMemes", "VOC2007", "SUN397", "Visual7W", "MSCOCO", "VisDial", "CIRR",
                 "MSCOCO_i2t", "MSCOCO_t2i", "NIGHTS", "WebQA")  # fmt: skip
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.)]\s*(.+?)\s*$")


class TeacherError(RuntimeError):
    """The server refused a request in a way retrying cannot fix (a 4xx other than 429): stop at once."""


class OutputRejected(ValueError):
    """The teacher's output was malformed (or the image unusable) after every retry; the image is rejected."""


def parse_questions(text: str, low: int = 3, high: int = 5) -> list[str]:
    """The questions of a numbered list ``1. ...?`` / ``2) ...?``: ``low`` to ``high`` of them, numbered 1, 2, ...,
    each ending in "?", no two alike; anything else raises ``ValueError`` saying what is wrong."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    questions = []
    for number, line in enumerate(lines, start=1):
        match = _NUMBERED.match(line)
        if not match:
            raise ValueError(f"line {number} is not a numbered item: {line[:80]!r}")
        if int(match.group(1)) != number:
            raise ValueError(f"item {number} is numbered {match.group(1)}")
        question = match.group(2)
        if not question.endswith("?"):
            raise ValueError(f"item {number} does not end with '?': {question[:80]!r}")
        questions.append(question)
    if not low <= len(questions) <= high:
        raise ValueError(f"{len(questions)} questions, expected {low} to {high}")
    if len({q.casefold() for q in questions}) != len(questions):
        raise ValueError("duplicate questions")
    return questions


def parse_question_range(text: str) -> tuple[int, int]:
    """``3-5`` or ``4`` -> (low, high)."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise ValueError(f"--questions takes N or LOW-HIGH, got {text!r}") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--questions needs 1 <= LOW <= HIGH, got {text!r}")
    return bounds


# ---------------------------------------------------------------------------------------------------------------
# Which images


def mmeb_train_images(
    root: str | os.PathLike, subsets: Sequence[str] | None = None, per_subset: int = 30_000, seed: int = 42
) -> list[str]:
    """Image paths (relative to the MMEB-train root) as the paper sampled them: every query, positive and negative
    image of each subset, de-duplicated across subsets, shuffled by ``seed``, at most ``per_subset`` each."""
    rng = random.Random(seed)
    seen: set[str] = set()
    chosen: list[str] = []
    for subset in subsets or PAPER_SUBSETS:
        pairs = read_mmeb_train_subset(Path(root) / subset, subset=subset)
        paths = sorted({p for pair in pairs for p in (pair.qry_image_path, pair.pos_image_path, pair.neg_image_path)
                        if p and p not in seen})  # fmt: skip
        rng.shuffle(paths)
        chosen += paths[:per_subset]
        seen.update(chosen)
    return chosen


def listed_images(source: str | os.PathLike, image_root: str | os.PathLike | None) -> tuple[list[str], Path]:
    """``(paths relative to the root, root)`` from a folder of images or a file with one path per line."""
    source = Path(source)
    if source.is_dir():
        root = Path(image_root) if image_root is not None else source
        return [str(path.relative_to(root)) for path in list_image_files(source)], root
    if not source.is_file():
        raise FileNotFoundError(f"--images: no such file or folder: {source}")
    root = Path(image_root) if image_root is not None else source.parent
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")], root


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class GenerateConfig:
    teacher_url: str
    teacher_model: str
    out: str
    mode: str = "qa"
    questions: tuple[int, int] = (3, 5)
    concurrency: int = 64
    timeout: float = 120.0
    max_retries: int = 5
    retry_backoff: float = 0.5
    temperature: float = 0.7
    max_tokens: int = 1024
    seed: int = 42
    api_key: str | None = None
    retry_rejects: bool = False
    max_pixels: int = 802_816  # the paper recipes' bound (1024 visual tokens): payloads stay small
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("qa", "caption"):
            raise ValueError(f"--mode must be qa or caption, got {self.mode!r}")
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("--concurrency must be >= 1 and --max-retries >= 0")


def data_url(path: Path, max_pixels: int) -> str:
    """The image as a base64 data URL: the file as it is when it is a PNG or JPEG within ``max_pixels``, otherwise
    scaled down to ``max_pixels`` and re-encoded (PNG stays PNG, the rest JPEG). Unreadable images raise."""
    image = load_image(path)
    kind = "png" if path.suffix.lower() == ".png" else "jpeg"
    if image.width * image.height <= max_pixels and path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        payload = path.read_bytes()
    else:
        if image.width * image.height > max_pixels:
            scale = (max_pixels / (image.width * image.height)) ** 0.5
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))))
        buffer = io.BytesIO()
        image.save(buffer, format=kind.upper(), **({"quality": 90} if kind == "jpeg" else {}))
        payload = buffer.getvalue()
    return f"data:image/{kind};base64,{base64.b64encode(payload).decode('ascii')}"


def _done_ids(path: Path) -> set[str]:
    """Ids of the complete records of an append-only JSONL file; a torn last line (a kill mid-write) is cut off."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return {json.loads(line)["id"] for line in data[:keep].decode("utf-8").splitlines() if line.strip()}


@dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    done: int = 0
    rejected: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)

    def retry(self, reason: str) -> None:
        self.retries += 1
        self.retry_reasons[reason] = self.retry_reasons.get(reason, 0) + 1


class Generator:
    """One ``coma generate`` run over ``images`` (paths relative to ``image_root``)."""

    def __init__(self, config: GenerateConfig, images: Sequence[str], image_root: str | os.PathLike) -> None:
        self.config = config
        self.images = list(dict.fromkeys(images))
        self.image_root = Path(image_root)
        self.out = Path(config.out)
        self.rejects = self.out.with_name(self.out.name.removesuffix(".jsonl") + ".rejects.jsonl")
        self.meta = self.out.with_name(self.out.name.removesuffix(".jsonl") + ".meta.json")
        self.counters = Counters()

    def _request_body(self, messages: list[dict], seed: int) -> dict:
        return {"model": self.config.teacher_model, "messages": messages, "temperature": self.config.temperature,
                "max_tokens": self.config.max_tokens, "seed": seed}  # fmt: skip

    async def _chat(self, client: Any, messages: list[dict], seed: int) -> str:
        """The assistant's reply; transport errors, timeouts, 429 and 5xx are retried with backoff and jitter."""
        import httpx

        config = self.config
        attempt = 0
        while True:
            wait = min(30.0, config.retry_backoff * 2**attempt) * (0.5 + random.random() / 2)
            try:
                self.counters.requests += 1
                response = await client.post("/chat/completions", json=self._request_body(messages, seed))
            except httpx.TransportError as error:
                reason = type(error).__name__
            else:
                if response.status_code == 200:
                    body = response.json()
                    usage = body.get("usage") or {}
                    self.counters.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                    self.counters.completion_tokens += int(usage.get("completion_tokens") or 0)
                    return body["choices"][0]["message"]["content"] or ""
                if response.status_code != 429 and response.status_code < 500:
                    raise TeacherError(
                        f"{response.status_code} from {config.teacher_url}: {_server_message(response)}"
                    )
                reason = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After")
                if response.status_code == 429 and retry_after:
                    with contextlib.suppress(ValueError):
                        wait = float(retry_after)
            if attempt == config.max_retries:
                raise OutputRejected(f"{reason} after {attempt + 1} attempts")
            self.counters.retry(reason)
            await asyncio.sleep(wait)
            attempt += 1

    async def _checked(self, client: Any, messages: list[dict], seed: int, parse: Any) -> Any:
        """``parse(reply)``; a malformed reply is asked again with a new seed, up to ``max_retries`` times."""
        attempt = 0
        while True:
            reply = await self._chat(client, messages, seed + attempt)
            try:
                return parse(reply)
            except ValueError as error:
                if attempt == self.config.max_retries:
                    raise OutputRejected(
                        f"malformed teacher output after {attempt + 1} attempts: {error}"
                    ) from None
                self.counters.retry("malformed output")
            attempt += 1

    async def conversation(self, client: Any, image: str, index: int) -> dict:
        """The LLaVA-style record of one image (questions, then the answers in one multi-turn chat)."""
        try:
            url = await asyncio.to_thread(data_url, self.image_root / image, self.config.max_pixels)
        except (ImageLoadError, OSError) as error:
            raise OutputRejected(f"image unusable: {error}") from None
        seed = self.config.seed * 1_000_003 + index
        picture = {"type": "image_url", "image_url": {"url": url}}
        if self.config.mode == "caption":
            prompt = random.Random(seed).choice(CAPTION_PROMPTS)
            caption = await self._checked(client, [_user(prompt, picture)], seed, _nonempty)
            return _record(image, [(prompt, caption)])
        low, high = self.config.questions
        questions = await self._checked(client, [_user(QUESTION_PROMPT.format(low=low, high=high), picture)], seed,
                                        lambda reply: parse_questions(reply, low, high))  # fmt: skip
        messages: list[dict] = []
        turns = []
        for number, question in enumerate(questions):
            messages.append(_user(question, picture if number == 0 else None))
            answer = await self._checked(client, messages, seed + 7919 * (number + 1), _nonempty)
            messages.append({"role": "assistant", "content": answer})
            turns.append((question, answer))
        return _record(image, turns)

    def todo(self) -> list[str]:
        """The images neither written nor (without ``retry_rejects``) rejected by an earlier run."""
        self.done_ids = _done_ids(self.out)
        self.rejected_ids = _done_ids(self.rejects)
        skip = self.done_ids | (set() if self.config.retry_rejects else self.rejected_ids)
        return [image for image in self.images if image not in skip]

    async def run(self) -> dict[str, Any]:
        import httpx

        started = time.perf_counter()
        todo = self.todo()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        limits = httpx.Limits(max_connections=self.config.concurrency)
        semaphore = asyncio.Semaphore(self.config.concurrency)
        bar = tqdm(total=len(todo), desc="generate", unit="img", disable=not self.config.show_progress,
                   dynamic_ncols=True)  # fmt: skip
        index = {image: i for i, image in enumerate(self.images)}
        with (
            open(self.out, "a", encoding="utf-8") as out,
            open(self.rejects, "a", encoding="utf-8") as rejects,
        ):

            async def one(client: httpx.AsyncClient, image: str) -> None:
                async with semaphore:
                    try:
                        record = await self.conversation(client, image, index[image])
                    except OutputRejected as error:
                        _append(rejects, {"id": image, "image": image, "reason": str(error)})
                        self.rejected_ids.add(image)
                        self.counters.rejected += 1
                    else:
                        _append(out, record)
                        self.done_ids.add(image)
                        self.counters.done += 1
                    seconds = max(time.perf_counter() - started, 1e-9)
                    c = self.counters
                    bar.set_postfix(req_s=f"{c.requests / seconds:.1f}", tok_s=f"{c.completion_tokens / seconds:.0f}",
                                    retries=c.retries, rejects=c.rejected, refresh=False)  # fmt: skip
                    bar.update(1)

            async with httpx.AsyncClient(base_url=self.config.teacher_url.rstrip("/"), timeout=self.config.timeout,
                                         headers=headers, limits=limits) as client:  # fmt: skip
                tasks = [asyncio.create_task(one(client, image)) for image in todo]
                try:
                    await asyncio.gather(*tasks)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    bar.close()
                    self.write_meta(len(todo), time.perf_counter() - started)
        return self.summary(time.perf_counter() - started)

    def summary(self, seconds: float) -> dict[str, Any]:
        c = self.counters
        return {"images": len(self.images), "done_this_run": c.done, "rejected_this_run": c.rejected,
                "requests": c.requests, "retries": c.retries, "retry_reasons": c.retry_reasons,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "seconds": round(seconds, 3), "images_per_s": round((c.done + c.rejected) / max(seconds, 1e-9), 2),
                "requests_per_s": round(c.requests / max(seconds, 1e-9), 2)}  # fmt: skip

    def write_meta(self, todo: int, seconds: float) -> None:
        settings = {
            key: value for key, value in asdict(self.config).items() if key not in ("api_key", "extra")
        }
        write_json(self.meta, {
            "teacher": {"url": self.config.teacher_url, "model": self.config.teacher_model},
            "prompts": {"version": PROMPT_VERSION, "questions": QUESTION_PROMPT, "captions": list(CAPTION_PROMPTS)},
            "settings": settings,
            "counts": {"images": len(self.images), "todo_at_start": todo, "records": len(self.done_ids),
                       "rejects": len(self.rejected_ids)},
            "last_run": self.summary(seconds),
            **self.config.extra,
        })  # fmt: skip


def _server_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500]


def _nonempty(reply: str) -> str:
    if not reply.strip():
        raise ValueError("empty reply")
    return reply.strip()


def _user(text: str, picture: dict | None) -> dict:
    if picture is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [picture, {"type": "text", "text": text}]}


def _record(image: str, turns: Sequence[tuple[str, str]]) -> dict:
    conversations = []
    for number, (question, answer) in enumerate(turns):
        value = f"{IMAGE_TOKEN}\n{question}" if number == 0 else question
        conversations += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": image, "image": image, "conversations": conversations}


def _append(handle: Any, record: dict) -> None:
    """One whole line at a time, flushed: a kill leaves at most one torn line, which the next run cuts off."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()


def generate(config: GenerateConfig, images: Sequence[str], image_root: str | os.PathLike) -> dict[str, Any]:
    """Run the generator to the end (or the first fatal teacher error); returns the run's summary."""
    return asyncio.run(Generator(config, images, image_root).run())
