"""The scripted teacher: an OpenAI-compatible chat-completions server on loopback with fault injection."""

from __future__ import annotations

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from coma.data.teacher_server import Faults, ScriptedTeacher

QUESTION_PROMPT = "Ask a numbered list of 3 to 5 questions about this image, one per line."
SCRIPT = {
    "red.png": [
        ("What colour is the circle?", "Red."),
        ("Where is the circle?", "In the top left."),
        ("What is the background?", "Dark blue."),
    ],
    "sub/green.png": [
        ("What shape is shown?", "A green square."),
        ("How many shapes are there?", "Two."),
        ("Is there any text?", "No."),
        ("What colour is the small shape?", "Yellow."),
    ],
    "blue.png": [
        ("What is drawn?", "A blue triangle on a grey gradient."),
        ("Where is the triangle?", "In the middle."),
        ("Is it large?", "Yes, it fills most of the image."),
    ],
}


def _write_images(root: Path) -> None:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (96, 96), (20, 30, 90))
    ImageDraw.Draw(image).ellipse((6, 6, 46, 46), fill=(230, 40, 40))
    image.save(root / "red.png")
    image = Image.new("RGB", (120, 80), (15, 15, 15))
    draw = ImageDraw.Draw(image)
    draw.rectangle((50, 10, 110, 70), fill=(40, 200, 60))
    draw.rectangle((5, 50, 25, 70), fill=(235, 215, 40))
    image.save(root / "sub" / "green.png")
    gradient = np.tile(np.linspace(60, 200, 80, dtype=np.uint8)[None, :, None], (80, 1, 3))
    image = Image.fromarray(gradient)
    ImageDraw.Draw(image).polygon([(40, 5), (75, 75), (5, 75)], fill=(50, 90, 235))
    image.save(root / "blue.png")


def _data_url(image: Image.Image, fmt: str = "PNG", **save: object) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _client_copy(path: Path) -> str:
    """What a client sends: the image resized and re-encoded as JPEG (bytes differ from the file)."""
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    return _data_url(resized, "JPEG", quality=75)


def _first_turn(url: str, text: str, image_first: bool = True) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return {"role": "user", "content": parts if image_first else parts[::-1]}


def _chat(client: httpx.Client, messages: list[dict], model: str = "scripted-teacher", **extra: object):
    body = {"model": model, "messages": messages, "temperature": 0.0, "max_tokens": 256, "seed": 0, **extra}
    return client.post("/chat/completions", json=body)


def _content(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    _write_images(tmp_path)
    return tmp_path


@pytest.fixture()
def served(image_root: Path):
    captions = {"blue.png": "A blue triangle on a grey gradient background."}
    teacher = ScriptedTeacher(SCRIPT, image_root, captions=captions)
    with teacher as url, httpx.Client(base_url=url, timeout=5.0) as client:
        assert url == teacher.base_url
        yield teacher, client


def test_models_and_questions(served, image_root: Path) -> None:
    teacher, client = served
    assert teacher.base_url.startswith("http://127.0.0.1:") and teacher.base_url.endswith("/v1")
    models = client.get("/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["scripted-teacher"]
    for name, pairs in SCRIPT.items():
        url = _data_url(Image.open(image_root / name))
        response = _chat(client, [_first_turn(url, QUESTION_PROMPT, image_first=name != "red.png")])
        expected = "\n".join(f"{i}. {q}" for i, (q, _) in enumerate(pairs, 1))
        assert _content(response) == expected
        reply = response.json()
        assert reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
        assert reply["model"] == "scripted-teacher" and isinstance(reply["created"], int)
        assert reply["choices"][0]["finish_reason"] == "stop" and reply["choices"][0]["index"] == 0
        usage = reply["usage"]
        assert usage["completion_tokens"] == len(expected.split())
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    stats = teacher.stats
    assert stats["kinds"]["questions"] == 3 and stats["status"][200] == 4 and stats["requests"] == 4


def test_multi_turn_answers_and_captions(served, image_root: Path) -> None:
    teacher, client = served
    for name, pairs in SCRIPT.items():
        url = _client_copy(image_root / name)
        messages = [_first_turn(url, pairs[0][0])]
        for index, (question, answer) in enumerate(pairs):
            if index:
                # later user turns come as a plain string or as a list with a text part
                content = question if index % 2 else [{"type": "text", "text": question}]
                messages.append({"role": "user", "content": content})
            got = _content(_chat(client, messages))
            assert got == answer
            messages.append({"role": "assistant", "content": got})
    caption = _content(
        _chat(client, [_first_turn(_client_copy(image_root / "blue.png"), "Describe the image.")])
    )
    assert caption == "A blue triangle on a grey gradient background."
    caption = _content(
        _chat(client, [_first_turn(_client_copy(image_root / "red.png"), "Describe the image.")])
    )
    assert caption == "Red."  # no caption given: the first scripted answer
    system = {"role": "system", "content": "You are a helpful assistant."}
    url = _client_copy(image_root / "sub/green.png")
    messages = [
        system,
        _first_turn(url, "What shape is shown?"),
        {"role": "assistant", "content": "A green square."},
    ]
    messages.append({"role": "user", "content": "  is there any TEXT?  "})  # whitespace and case are forgiven
    assert _content(_chat(client, messages)) == "No."
    messages[-1] = {"role": "user", "content": "What is the meaning of life?"}
    response = _chat(client, messages)
    assert response.status_code == 400 and "question not in the script" in response.json()["error"]["message"]
    assert teacher.stats["kinds"] == {"questions": 0, "caption": 2, "answer": 11}


def test_recognition_of_re_encoded_copies_and_unknown_images(served, image_root: Path) -> None:
    teacher, client = served
    with Image.open(image_root / "sub/green.png") as image:
        small = image.convert("RGB").resize((60, 40), Image.Resampling.BILINEAR)
    response = _chat(client, [_first_turn(_data_url(small, "JPEG", quality=40), QUESTION_PROMPT)])
    assert _content(response).startswith("1. What shape is shown?\n2. How many shapes")
    for name in SCRIPT:
        with Image.open(image_root / name) as image:
            assert teacher.recognise(image.resize((448, 448)))[0][0] == name
    rng = np.random.default_rng(0)
    for _ in range(3):
        blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        unknown = Image.fromarray(blocks).resize((96, 96), Image.Resampling.NEAREST)
        response = _chat(client, [_first_turn(_data_url(unknown), QUESTION_PROMPT)])
        assert response.status_code == 400
        assert "unknown image" in response.json()["error"]["message"]


def test_bad_requests(served, image_root: Path) -> None:
    teacher, client = served
    url = _client_copy(image_root / "red.png")
    response = _chat(client, [_first_turn(url, QUESTION_PROMPT)], model="gpt-4o")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `gpt-4o` does not exist."
    response = client.post(
        "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    response = _chat(client, [])
    assert response.status_code == 400 and "no messages" in response.json()["error"]["message"]
    response = _chat(client, [{"role": "user", "content": "no image here"}])
    assert response.status_code == 400 and "image" in response.json()["error"]["message"]
    response = _chat(client, [_first_turn("https://example.com/cat.png", QUESTION_PROMPT)])
    assert response.status_code == 400 and "data:" in response.json()["error"]["message"]
    response = _chat(client, [_first_turn(url, "What colour is the circle?")], max_tokens=1)
    assert response.json()["choices"][0] == {
        "index": 0,
        "message": {"role": "assistant", "content": "Red."},
        "finish_reason": "stop",
    }
    response = _chat(client, [_first_turn(url, "Where is the circle?")], max_tokens=2)
    assert _content(response) == "In the" and response.json()["choices"][0]["finish_reason"] == "length"
    assert teacher.stats["status"][400] == 4 and teacher.stats["status"][404] == 1


def test_api_key(image_root: Path) -> None:
    teacher = ScriptedTeacher(SCRIPT, image_root, api_key="sk-right")
    with teacher:
        messages = [_first_turn(_client_copy(image_root / "red.png"), QUESTION_PROMPT)]
        for headers in ({"Authorization": "Bearer sk-wrong"}, {}):
            with httpx.Client(base_url=teacher.base_url, timeout=5.0, headers=headers) as client:
                response = _chat(client, messages)
                assert response.status_code == 401
                error = response.json()["error"]
                assert error["message"] == "Incorrect API key provided"
                assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
                assert client.get("/models").status_code == 401
        with httpx.Client(base_url=teacher.base_url, headers={"Authorization": "Bearer sk-right"}) as client:
            assert _content(_chat(client, messages)).startswith("1. What colour is the circle?")


def _teacher_with(image_root: Path, **faults: float) -> ScriptedTeacher:
    return ScriptedTeacher(SCRIPT, image_root, faults=Faults(**faults))


def test_fault_errors_and_rate_limits(image_root: Path) -> None:
    messages = [_first_turn(_client_copy(image_root / "red.png"), QUESTION_PROMPT)]
    with (
        (teacher := _teacher_with(image_root, error_rate=1.0)) as url,
        httpx.Client(base_url=url) as client,
    ):
        statuses = set()
        for _ in range(8):
            response = _chat(client, messages)
            statuses.add(response.status_code)
            assert "injected fault" in response.json()["error"]["message"]
            assert response.headers["X-Scripted-Fault"] == "error"
        assert statuses <= {500, 502, 503} and len(statuses) >= 2
        assert teacher.stats["faults"]["error"] == 8
    with (
        (teacher := _teacher_with(image_root, rate_limit_rate=1.0)) as url,
        httpx.Client(base_url=url) as client,
    ):
        response = _chat(client, messages)
        assert response.status_code == 429 and response.headers["Retry-After"] == "0.05"
        assert response.json()["error"]["type"] == "RateLimitError"
        assert client.get("/models").status_code == 200  # faults hit chat completions only
        assert teacher.stats["faults"]["rate_limit"] == 1


def test_fault_slow_replies_time_out(image_root: Path) -> None:
    messages = [_first_turn(_client_copy(image_root / "red.png"), QUESTION_PROMPT)]
    with (teacher := _teacher_with(image_root, slow_rate=1.0, slow_seconds=1.0)) as url:
        with httpx.Client(base_url=url, timeout=0.2) as client, pytest.raises(httpx.ReadTimeout):
            _chat(client, messages)
        assert teacher.stats["faults"]["slow"] == 1
    teacher = _teacher_with(image_root, slow_rate=1.0, slow_seconds=0.05)
    with teacher, httpx.Client(base_url=teacher.base_url, timeout=5.0) as client:
        response = _chat(client, messages)
        assert _content(response).startswith("1. ") and response.headers["X-Scripted-Fault"] == "slow"


def _is_valid_list(text: str, expected: list[str]) -> bool:
    return text == "\n".join(f"{i}. {q}" for i, q in enumerate(expected, 1))


def test_fault_malformed_replies(image_root: Path) -> None:
    picture = _client_copy(image_root / "sub/green.png")
    questions = [q for q, _ in SCRIPT["sub/green.png"]]
    with (
        (teacher := _teacher_with(image_root, malformed_rate=1.0)) as url,
        httpx.Client(base_url=url) as client,
    ):
        kinds = set()
        for _ in range(12):
            response = _chat(client, [_first_turn(picture, QUESTION_PROMPT)])
            text = _content(response)
            kind = response.headers["X-Scripted-Fault"]
            kinds.add(kind)
            assert not _is_valid_list(text, questions)
            lines = text.splitlines()
            if kind == "malformed-prose":
                assert len(lines) == 1 and not text.startswith("1.")
            elif kind == "malformed-too_few":
                assert len(lines) == 2
            elif kind == "malformed-duplicate":
                assert len({line.split(". ", 1)[1] for line in lines}) < len(lines)
            else:
                assert kind == "malformed-no_question_mark" and any("?" not in line for line in lines)
        assert len(kinds) >= 3
        answer = _chat(client, [_first_turn(picture, questions[0]), {"role": "assistant", "content": "x"}])
        assert answer.status_code == 400  # the last message must be the user's question
        messages = [_first_turn(picture, questions[0]), {"role": "assistant", "content": "A green square."}]
        messages.append({"role": "user", "content": questions[1]})
        response = _chat(client, messages)
        assert _content(response) == "" and response.json()["usage"]["completion_tokens"] == 0
        assert teacher.stats["faults"]["malformed"] == 13


def test_fault_dropped_connections(image_root: Path) -> None:
    messages = [_first_turn(_client_copy(image_root / "red.png"), QUESTION_PROMPT)]
    with (
        (teacher := _teacher_with(image_root, drop_rate=1.0)) as url,
        httpx.Client(base_url=url) as client,
    ):
        for _ in range(2):
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                _chat(client, messages)
        assert teacher.stats["faults"]["drop"] == 2 and teacher.stats["status"] == {}


def _fault_sequence(image_root: Path, seed: int, n: int = 24) -> list[str]:
    messages = [_first_turn(_client_copy(image_root / "red.png"), QUESTION_PROMPT)]
    faults = {
        "error_rate": 0.2,
        "rate_limit_rate": 0.2,
        "malformed_rate": 0.2,
        "drop_rate": 0.1,
        "seed": seed,
    }
    outcomes = []
    with (teacher := _teacher_with(image_root, **faults)) as url, httpx.Client(base_url=url) as client:
        for _ in range(n):
            try:
                response = _chat(client, messages)
            except httpx.TransportError:
                outcomes.append("drop")
                continue
            outcomes.append(f"{response.status_code}:{response.headers.get('X-Scripted-Fault', '')}")
        stats = teacher.stats
    assert stats["faults"]["drop"] == outcomes.count("drop")
    assert sum(stats["faults"].values()) == sum(not o.endswith("200:") for o in outcomes)
    return outcomes


def test_fault_draws_are_reproducible(image_root: Path) -> None:
    first = _fault_sequence(image_root, seed=3)
    assert first == _fault_sequence(image_root, seed=3)
    assert first != _fault_sequence(image_root, seed=4)
    assert len({outcome.split(":")[0] for outcome in first}) >= 3  # a mix of outcomes, not all one kind


def test_fault_rates_are_checked(image_root: Path) -> None:
    with pytest.raises(ValueError, match="sum to at most 1"):
        Faults(error_rate=0.6, drop_rate=0.6)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        Faults(slow_rate=1.5)
    with pytest.raises(ValueError, match="captions for images not in the script"):
        ScriptedTeacher(SCRIPT, image_root, captions={"missing.png": "x"})


def test_stop_frees_the_port(image_root: Path) -> None:
    teacher = ScriptedTeacher(SCRIPT, image_root)
    url = teacher.start()
    port = teacher.port
    with httpx.Client(base_url=url) as client:
        assert client.get("/models").status_code == 200  # leaves a keep-alive connection open
        teacher.stop()
        teacher.stop()  # idempotent
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
        with pytest.raises(httpx.TransportError):
            client.get("/models")
    assert teacher.port is None and teacher.base_url is None
    assert teacher.start().startswith("http://127.0.0.1:")  # it can serve again
    teacher.stop()


def test_concurrent_clients(served, image_root: Path) -> None:
    teacher, _ = served
    urls = {name: _client_copy(image_root / name) for name in SCRIPT}

    def ask(name: str) -> list[str]:
        with httpx.Client(base_url=teacher.base_url, timeout=5.0) as client:
            return [_content(_chat(client, [_first_turn(urls[name], q)])) for q, _ in SCRIPT[name]]

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(ask, [*SCRIPT, *SCRIPT]))
    assert results == [[a for _, a in SCRIPT[name]] for name in [*SCRIPT, *SCRIPT]]
    stats = teacher.stats
    assert stats["requests"] == stats["status"][200] == stats["kinds"]["answer"] == 20
