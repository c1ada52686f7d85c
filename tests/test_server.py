"""``coma serve`` over real HTTP on loopback: answers equal ``Embedder.encode``, concurrent requests share forwards,
and every kind of bad input gets its 4xx in OpenAI's error shape while the server stays up."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import random_image

from coma.cli import main
from coma.compression import embedding_text
from coma.embedder import Embedder, EncodeInput
from coma.serving.chat_template import embedding_chat_template
from coma.serving.index import Index
from coma.serving.server import MicroBatcher, create_app, serve_in_thread

NAME = "tiny-coma"
MAX_IMAGE_BYTES = 512 * 1024
MAX_BODY_BYTES = 4 * 2**20
TIMEOUT = 30.0
CORPUS = {
    "apple": "a red apple on a wooden table",
    "car": "a blue car in the rain",
    "sea": "the ocean at night",
}


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _image_url(path: Path) -> str:
    return _data_url(path.read_bytes())


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` pixels but holds none: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _user(*parts: dict | str) -> dict:
    content = [{"type": "text", "text": part} if isinstance(part, str) else part for part in parts]
    return {"role": "user", "content": content}


def _vectors(reply: httpx.Response) -> np.ndarray:
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert [row["index"] for row in body["data"]] == list(range(len(body["data"])))
    return np.array([row["embedding"] for row in body["data"]], dtype=np.float32)


@pytest.fixture(scope="module")
def embedder(tiny_model_dir: Path) -> Embedder:
    return Embedder.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def index(embedder: Embedder, image_files: list[Path]) -> Index:
    inputs = [*CORPUS.values(), *(EncodeInput(image=str(path)) for path in image_files[:2])]
    ids = [*CORPUS, "img0", "img1"]
    return Index.build(embedder, inputs, ids=ids, show_progress=False)


@pytest.fixture(scope="module")
def server(embedder: Embedder, index: Index):
    app = create_app(
        embedder,
        served_model_name=NAME,
        index=index,
        max_image_bytes=MAX_IMAGE_BYTES,
        max_body_bytes=MAX_BODY_BYTES,
    )
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server[1], timeout=TIMEOUT) as client:
        yield client


def test_health_and_models(client: httpx.Client) -> None:
    before = client.get("/health").json()
    assert before["status"] == "ok"
    assert client.post("/v1/embeddings", json={"input": ["one", "two"]}).status_code == 200
    after = client.get("/health").json()
    assert after["items"] - before["items"] == 2 and 1 <= after["forwards"] - before["forwards"] <= 2
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [card["id"] for card in models["data"]] == [NAME]
    assert models["data"][0]["object"] == "model" and models["data"][0]["owned_by"] == "coma"


def test_text_embeddings_equal_encode(client: httpx.Client, embedder: Embedder) -> None:
    texts = ["a photo of a dog", "Représente cette phrase.", "x"]
    expected = embedder.encode(texts, show_progress=False)
    reply = client.post("/v1/embeddings", json={"model": NAME, "input": texts, "encoding_format": "float"})
    np.testing.assert_allclose(_vectors(reply), expected, atol=1e-5)
    body = reply.json()
    assert body["object"] == "list" and body["model"] == NAME and body["id"].startswith("embd-")
    assert isinstance(body["created"], int) and body["data"][0]["object"] == "embedding"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3 * embedder.config.num_tokens
    single = client.post("/v1/embeddings", json={"input": texts[0], "dimensions": expected.shape[1]})
    np.testing.assert_allclose(_vectors(single), expected[:1], atol=1e-5)
    packed = client.post("/v1/embeddings", json={"model": NAME, "input": texts, "encoding_format": "base64"})
    assert packed.status_code == 200, packed.text
    decoded = [
        np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4") for row in packed.json()["data"]
    ]
    np.testing.assert_allclose(np.stack(decoded), expected, atol=1e-5)


def test_messages_equal_encode_with_instruction(
    client: httpx.Client, embedder: Embedder, image_files: list[Path]
) -> None:
    url0, url1 = _image_url(image_files[0]), _image_url(image_files[1])
    system = {"role": "system", "content": "Find the matching picture."}
    conversations = [
        [_user(_image_part(url0))],
        [_user(_image_part(url1), "a caption of the image")],
        [system, _user("a caption of the image", _image_part(url1))],
        [system, {"role": "user", "content": "a text query"}],
        [system, {"role": "user", "content": "<|image_1|>"}],  # a placeholder without an image is dropped
    ]
    reply = client.post("/v1/embeddings", json={"model": NAME, "messages": conversations})
    got = _vectors(reply)
    plain = embedder.encode(
        [str(image_files[0]), {"text": "a caption of the image", "image": str(image_files[1])}],
        show_progress=False,
    )
    instructed = embedder.encode(
        [{"text": "a caption of the image", "image": str(image_files[1])}, "a text query", "<|image_1|>"],
        instruction="Find the matching picture.",
        show_progress=False,
    )
    np.testing.assert_allclose(got, np.concatenate([plain, instructed]), atol=1e-5)
    assert reply.json()["usage"]["prompt_tokens"] > 4 * embedder.config.num_tokens
    one = client.post("/v1/embeddings", json={"messages": conversations[2]})  # one conversation, not a batch
    np.testing.assert_allclose(_vectors(one), instructed[:1], atol=1e-5)


@pytest.mark.parametrize(
    "conversation",
    [
        [{"role": "system", "content": [{"type": "text", "text": "Find "}, {"type": "text", "text": "it."}]},
         {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}],
        [{"role": "user", "content": "Is <|image_1|> red?"}, {"role": "user", "content": [{"type": "image_url"}]}],
        [{"role": "system", "content": "Retrieve"}, {"role": "user", "content": "<|image_1|>\nthe rest"}],
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]}],
    ],
)  # fmt: skip
def test_conversations_read_as_the_exported_chat_template_renders_them(
    server, embedder: Embedder, image_files: list[Path], conversation: list[dict]
) -> None:
    """This server and vLLM serving the exported folder (its chat template) embed one conversation alike."""
    url = _image_url(image_files[0])
    for message in conversation:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part["type"] == "image_url":
                part["image_url"] = {"url": url}
    item = server[0].state.service._conversation(conversation, "messages")
    template = embedding_chat_template(embedder.config, embedder.adapter.image_block)
    rendered = embedder.processor.tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False
    )
    has_image = item.input.image is not None
    assert rendered == embedding_text(
        item.input.text, has_image, embedder.config, embedder.adapter.image_block
    )


def test_texts_naming_files_stay_texts(
    client: httpx.Client, embedder: Embedder, image_files: list[Path]
) -> None:
    """``encode`` opens a string that names an image file; the server never reads its own files for a client."""
    path = str(image_files[0])
    got = _vectors(client.post("/v1/embeddings", json={"input": [path]}))
    np.testing.assert_allclose(got, embedder.encode([EncodeInput(text=path)], show_progress=False), atol=1e-5)
    assert not np.allclose(got, embedder.encode([path], show_progress=False), atol=1e-3)


def test_search_finds_the_query_first(client: httpx.Client, image_files: list[Path]) -> None:
    reply = client.post("/v1/search", json={"model": NAME, "input": CORPUS["car"], "k": 2})
    assert reply.status_code == 200, reply.text
    hits = reply.json()["data"]
    assert [hit["rank"] for hit in hits] == [1, 2] and hits[0]["id"] == "car"
    assert hits[0]["text"] == CORPUS["car"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    conversation = [_user(_image_part(_image_url(image_files[1])))]
    hits = client.post("/v1/search", json={"messages": conversation}).json()["data"]
    assert hits[0]["id"] == "img1" and hits[0]["image"] and len(hits) == 5


def test_search_needs_an_index(embedder: Embedder) -> None:
    with serve_in_thread(create_app(embedder, served_model_name=NAME)) as url:
        reply = httpx.post(f"{url}/v1/search", json={"input": "a query"}, timeout=TIMEOUT)
        assert reply.status_code == 404 and "--index" in reply.json()["error"]["message"]
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "a"}, timeout=TIMEOUT).status_code == 200


def test_concurrent_clients_share_forwards(server, embedder: Embedder, image_files: list[Path]) -> None:
    app, url = server
    clients, per_client = 64, 2
    requests = {
        (c, r): {"input": [f"client {c} asks question {r}"]}
        if r == 0
        else {"messages": [_user(f"client {c} sends a picture", _image_part(_image_url(image_files[c % 4])))]}
        for c in range(clients)
        for r in range(per_client)
    }
    expected_inputs = [
        body["input"][0]
        if "input" in body
        else {"text": f"client {c} sends a picture", "image": str(image_files[c % 4])}
        for (c, _), body in requests.items()
    ]
    expected = dict(zip(requests, embedder.encode(expected_inputs, show_progress=False), strict=True))
    before = app.state.service.batcher.stats
    barrier = threading.Barrier(clients, timeout=TIMEOUT)

    def run_client(c: int) -> list[np.ndarray]:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as client:
            barrier.wait()
            return [
                _vectors(client.post("/v1/embeddings", json=requests[c, r]))[0] for r in range(per_client)
            ]

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(run_client, range(clients)))
    for c, vectors in enumerate(answers):
        for r, vector in enumerate(vectors):
            np.testing.assert_allclose(vector, expected[c, r], atol=1e-5)
    after = app.state.service.batcher.stats
    forwards, items = after["forwards"] - before["forwards"], after["items"] - before["items"]
    assert items == clients * per_client
    assert forwards < items / 4, after["batch_sizes"]


def test_a_failing_forward_fails_only_its_request(server) -> None:
    app, url = server
    batcher = app.state.service.batcher
    forward = batcher.forward

    def exploding(items: list[EncodeInput]):
        if any("explode" in item.text for item in items):
            raise RuntimeError("the model exploded")
        return forward(items)

    batcher.forward = exploding
    try:
        with ThreadPoolExecutor(2) as pool:
            bad, good = pool.map(
                lambda text: httpx.post(f"{url}/v1/embeddings", json={"input": text}, timeout=TIMEOUT),
                ["please explode", "stay calm"],
            )
    finally:
        batcher.forward = forward
    assert bad.status_code == 500 and "exploded" in bad.json()["error"]["message"]
    assert good.status_code == 200


def test_batcher_runs_failing_items_alone() -> None:
    calls: list[list[str]] = []

    def forward(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(forward, max_batch_size=3, max_wait_ms=200)

    async def submit_all() -> list:
        jobs = [batcher.submit(["a", "b"]), batcher.submit(["bad"]), batcher.submit(["c", "d"])]
        return await asyncio.gather(*jobs, return_exceptions=True)

    batcher.start()
    try:
        results = asyncio.run(submit_all())
    finally:
        batcher.stop()
    assert results[0] == ["A", "B"] and isinstance(results[1], ValueError) and results[2] == ["C", "D"]
    assert calls == [["a", "b", "bad"], ["a"], ["b"], ["bad"], ["c", "d"]]
    assert batcher.stats == {"forwards": 3, "items": 4, "batch_sizes": {1: 2, 2: 1}, "failed_forwards": 2}


def _bad_requests(image_files: list[Path]) -> list[tuple[str, dict, int, str | None]]:
    """(case, request, status, param) for every class of bad input."""
    good_url = _image_url(image_files[0])
    noise = random_image(7, (512, 512))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert len(buffer.getvalue()) > MAX_IMAGE_BYTES

    def image(url: str) -> dict:
        return {"json": {"messages": [_user("text", _image_part(url))]}}

    url_param = "messages[0].content[1].image_url.url"
    return [
        ("unknown model", {"json": {"model": "gpt-4", "input": "a"}}, 404, "model"),
        ("undecodable image", image(_data_url(b"not an image at all")), 400, url_param),
        ("bad base64", image("data:image/png;base64,@@@@"), 400, url_param),
        ("oversized image", image(_data_url(buffer.getvalue())), 413, url_param),
        ("decompression bomb", image(_data_url(_png_header(9000, 9000))), 400, url_param),
        ("extreme aspect ratio", image(_data_url(_png_header(4000, 10))), 400, url_param),
        ("http url", image("https://example.com/cat.png"), 400, url_param),
        ("file url", image("file:///etc/passwd"), 400, url_param),
        ("empty string", {"json": {"input": ""}}, 400, "input"),
        ("empty list", {"json": {"input": []}}, 400, "input"),
        ("empty item", {"json": {"input": ["a", ""]}}, 400, "input[1]"),
        ("input a number", {"json": {"input": 5}}, 400, "input"),
        ("input item a number", {"json": {"input": ["a", 3]}}, 400, "input[1]"),
        ("token ids", {"json": {"input": [1, 2, 3]}}, 400, "input"),
        ("token id batches", {"json": {"input": [[1, 2], [3]]}}, 400, "input"),
        (
            "content an int",
            {"json": {"messages": [{"role": "user", "content": 5}]}},
            400,
            "messages[0].content",
        ),
        (
            "text part not a string",
            {"json": {"messages": [[{"role": "user", "content": [{"type": "text", "text": 1}]}]]}},
            400,
            "messages[0][0].content[0].text",
        ),
        (
            "unknown part type",
            {"json": {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}},
            400,
            "messages[0].content[0].type",
        ),
        (
            "assistant turn",
            {"json": {"messages": [{"role": "assistant", "content": "hi"}]}},
            400,
            "messages[0].role",
        ),
        (
            "two images",
            {"json": {"messages": [_user(_image_part(good_url), _image_part(good_url))]}},
            400,
            "messages[0].content[1].image_url.url",
        ),
        (
            "image in the system message",
            {"json": {"messages": [{"role": "system", "content": [_image_part(good_url)]}, _user("a")]}},
            400,
            "messages[0].content[0].image_url.url",
        ),
        ("no user content", {"json": {"messages": [{"role": "system", "content": "only"}]}}, 400, "messages"),
        (
            "two placeholders",
            {"json": {"messages": [_user("<|image_1|> and <|image_1|>", _image_part(good_url))]}},
            400,
            "messages",
        ),
        ("too many tokens", {"json": {"input": ["ok", "word " * 9000]}}, 400, "input[1]"),
        ("input and messages", {"json": {"input": "a", "messages": [_user("b")]}}, 400, "input"),
        ("neither input nor messages", {"json": {"model": NAME}}, 400, "input"),
        ("bad encoding format", {"json": {"input": "a", "encoding_format": "hex"}}, 400, "encoding_format"),
        ("other dimensions", {"json": {"input": "a", "dimensions": 7}}, 400, "dimensions"),
        ("model not a string", {"json": {"model": 3, "input": "a"}}, 400, "model"),
        (
            "malformed json",
            {"content": b'{"input": ', "headers": {"content-type": "application/json"}},
            400,
            None,
        ),
        ("body not an object", {"json": ["a"]}, 400, None),
        ("body too large", {"content": b"x" * (MAX_BODY_BYTES + 1)}, 413, None),
        ("chunked body too large", {"content": iter([b"x" * 2**20] * 5)}, 413, None),
    ]


SEARCH_CASES = [
    ("k zero", {"input": "a", "k": 0}, "k"),
    ("k a string", {"input": "a", "k": "5"}, "k"),
    ("k too large", {"input": "a", "k": 1001}, "k"),
    ("query a list", {"input": ["a"]}, "input"),
    ("a batch of conversations", {"messages": [[_user("a")], [_user("b")]]}, "messages"),
]


def test_bad_inputs_get_4xx_naming_the_field(
    client: httpx.Client, embedder: Embedder, image_files: list[Path]
) -> None:
    for case, request, status, param in _bad_requests(image_files):
        reply = client.post("/v1/embeddings", **request)
        assert reply.status_code == status, (case, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and error["code"] == status and error["message"] and error["type"], (
            case
        )
    for case, body, param in SEARCH_CASES:
        reply = client.post("/v1/search", json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (case, reply.text)
    assert client.get("/v1/nothing").json()["error"]["code"] == 404
    assert client.get("/v1/embeddings").json()["error"]["code"] == 405
    before = client.get("/health").json()
    assert before["status"] == "ok"
    assert client.post("/v1/embeddings", json={"input": ["one", "two"]}).status_code == 200
    after = client.get("/health").json()
    assert after["items"] - before["items"] == 2 and 1 <= after["forwards"] - before["forwards"] <= 2
    np.testing.assert_allclose(
        _vectors(client.post("/v1/embeddings", json={"input": "still up"})),
        embedder.encode(["still up"], show_progress=False),
        atol=1e-5,
    )


def test_bad_input_messages_are_clear(client: httpx.Client) -> None:
    def message(body: dict) -> str:
        return client.post("/v1/embeddings", json=body).json()["error"]["message"]

    bomb = {"messages": [_user(_image_part(_data_url(_png_header(9000, 9000))))]}
    assert "9000×9000 pixels" in message(bomb) and "decompression bomb" in message(bomb)
    fetch = {"messages": [_user(_image_part("http://example.com/a.png"))]}
    assert "only data: URLs" in message(fetch) and "does not fetch" in message(fetch)
    assert "not supported" in message({"input": [1, 2]})
    assert "not a PNG, JPEG" in message({"messages": [_user(_image_part(_data_url(b"garbage")))]})


def test_serve_cli_serves_an_index(monkeypatch, tmp_path: Path, tiny_model_dir: Path, index: Index) -> None:
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(app=app, **options))
    folder = index.save(tmp_path / "index")
    argv = [
        "serve",
        "--index",
        str(folder),
        "--model",
        str(tiny_model_dir),
        "--port",
        "8123",
        "--no-batching",
    ]
    assert main(argv) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == 8123
    service = served["app"].state.service
    assert service.served_model_name == tiny_model_dir.name and service.batcher.max_batch_size == 1
    with serve_in_thread(served["app"]) as url:
        reply = httpx.post(
            f"{url}/v1/search", json={"model": tiny_model_dir.name, "input": CORPUS["sea"]}, timeout=TIMEOUT
        )
        assert reply.status_code == 200 and reply.json()["data"][0]["id"] == "sea"


def test_serve_cli_refuses_bad_flags(capsys) -> None:
    assert main(["serve"]) == 1
    assert "pass --model" in capsys.readouterr().err
    assert main(["serve", "--model", "m", "--max-batch-size", "0"]) == 1
    assert "--max-batch-size must be at least 1" in capsys.readouterr().err
