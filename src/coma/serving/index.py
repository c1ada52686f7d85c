"""A faiss index over coma embeddings: build it from inputs (resumable through the eval cache), add, search, save.

``INDEX_DIR`` holds ``index.faiss`` (the faiss index; row ``i`` is faiss id ``i``), ``rows.jsonl`` (the id, text,
image and source of every row, in faiss order) and ``index.json`` (kind, parameters, dim, count, metric, the
model's path, fingerprint, coma config and dtype, and the versions it was made with). Each file is written
atomically; :meth:`Index.load` checks that they agree.

Every kind scores by inner product, which is the cosine similarity of coma's L2-normalised embeddings:

* ``flat``: exact search (``IndexFlatIP``), the default; a CPU scans about a million 2048-d rows a second per core.
* ``hnsw``: a graph (``IndexHNSWFlat``) with ``hnsw_m`` links per node (32) and beam widths ``ef_construction``
  (200) and ``ef_search`` (128); keeps the full vectors plus the graph, needs no training, answers far faster.
* ``ivfpq``: ``nlist`` k-means cells (default 4·√N, at most N/39 so each cell gets the 39 training points faiss
  asks for) over product-quantised codes of ``pq_m`` sub-quantizers × ``nbits`` bits (default ``pq_m``: the largest
  divisor of the dim that is at most 64, so 64 bytes a vector at 8 bits), ``nprobe`` cells searched per query (16).
  It is trained on the vectors it is built from, which must number at least ``nlist`` and ``2**nbits``; later
  :meth:`Index.add` calls encode with that training.

Embedding goes through :class:`coma.eval.cache.EmbeddingCache` when a cache folder is given, keyed like the eval
harness keys its inputs, so an interrupted build re-encodes only what the cache lacks.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from coma.io import atomic_write_bytes, iter_jsonl, write_json, write_jsonl

if TYPE_CHECKING:
    from coma.embedder import Embedder, EncodeInput

logger = logging.getLogger(__name__)

FAISS_FILE = "index.faiss"
ROWS_FILE = "rows.jsonl"
META_FILE = "index.json"
FORMAT_VERSION = 1
PIL_IMAGE = "<PIL image>"
MIN_POINTS_PER_CENTROID = 39  # what faiss's k-means asks for
KIND_PARAMS: dict[str, dict[str, int | None]] = {
    "flat": {},
    "hnsw": {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128},
    "ivfpq": {"nlist": None, "pq_m": None, "nbits": 8, "nprobe": 16},
}
KINDS = tuple(KIND_PARAMS)
_VERSIONED = ("coma", "faiss-cpu", "numpy", "torch", "transformers")


def import_faiss() -> Any:
    """The faiss module, imported on first use so coma works without it."""
    try:
        import faiss
    except ImportError:
        raise ImportError("faiss-cpu is not installed: pip install 'coma[index]'") from None
    return faiss


@dataclass(frozen=True)
class Row:
    """What the index records of one row besides its vector; ``image`` is "" when the row has none."""

    id: str
    text: str = ""
    image: str = ""
    source: str = ""


@dataclass(frozen=True)
class SearchHit:
    """One result: ``rank`` is 1-based, ``score`` the inner product (cosine for coma embeddings)."""

    rank: int
    score: float
    id: str
    text: str
    image: str
    source: str


@dataclass(frozen=True)
class EncodeStats:
    """What one build or add cost: distinct inputs run through the model, found in the cache, and seconds."""

    encoded: int
    cached: int
    seconds: float


@dataclass(frozen=True)
class Embedded:
    """Result of :func:`embed_inputs`: the rows' vectors, the inputs as encoded (before the instruction)."""

    embeddings: np.ndarray
    items: list[EncodeInput]
    fingerprint: str
    stats: EncodeStats


def _image_identity(image: Any, image_root: str | os.PathLike | None, label: str) -> tuple[str, tuple | None]:
    """``(name, (size, mtime_ns))`` of an image for its cache key; a PIL image is named by a digest of its pixels."""
    from coma.data.images import ImageLoadError, resolve_image_path

    if isinstance(image, Image.Image):
        digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
        return f"{PIL_IMAGE} sha256:{digest.hexdigest()}", None
    try:
        path = resolve_image_path(image, image_root)
    except ImageLoadError as error:
        raise ValueError(f"{label}: {error}") from None
    try:
        stat = path.stat()
    except OSError:
        raise FileNotFoundError(f"{label}: image not found: {path}") from None
    return str(image), (stat.st_size, stat.st_mtime_ns)


def embed_inputs(
    embedder: Embedder,
    inputs: Sequence[Any],
    *,
    labels: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    instruction: str | None = None,
    batch_size: int = 32,
    show_progress: bool = True,
    image_root: str | os.PathLike | None = None,
    fingerprint: str | None = None,
) -> Embedded:
    """Embed ``inputs`` as :meth:`Embedder.encode` does, each distinct one once, reusing ``cache_dir``'s rows.

    The cache key is the eval harness's (:func:`coma.eval.cache.input_key` of the text with the instruction put
    before it, the image path and the file's size and mtime) under the model's fingerprint and template, so a
    re-run encodes only what an interrupted one did not write. ``labels`` name the inputs in errors;
    ``fingerprint`` is the model's when the caller hashed it already.
    """
    from tqdm.auto import tqdm

    from coma.data.formats import PlaceholderFixes
    from coma.embedder import EncodeInput, as_encode_input
    from coma.eval.cache import EmbeddingCache, input_key, model_fingerprint
    from coma.eval.runner import backbone_config, template_settings

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    started = time.perf_counter()

    def label(i: int) -> str:
        return labels[i] if labels is not None and labels[i] else f"input {i}"

    items = []
    fixes = PlaceholderFixes(embedder.config.image_placeholder)
    for i, raw in enumerate(inputs):
        try:
            item = as_encode_input(raw)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{label(i)}: {error}") from None
        items.append(EncodeInput(fixes.fix(item.text, item.image is not None, "index", "inputs"), item.image))
    for line in fixes.lines():
        logger.warning(line)
    model_inputs, keys = [], []
    for i, item in enumerate(items):
        # As Embedder.encode puts it; the key holds the text the model sees.
        text = (f"{instruction}\n{item.text}" if item.text else instruction) if instruction else item.text
        name, stat = ("", None) if item.image is None else _image_identity(item.image, image_root, label(i))
        model_inputs.append(EncodeInput(text, item.image))
        keys.append(input_key(text, name, stat))
    if fingerprint is None:
        fingerprint = model_fingerprint(embedder.model, backbone_config(embedder))
    cache = (
        EmbeddingCache(cache_dir, fingerprint, template_settings(embedder)) if cache_dir is not None else None
    )
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    todo = [i for key, i in first.items() if cache is None or key not in cache]
    # Batches of like inputs pad little (Embedder.encode's order, over every batch).
    todo.sort(key=lambda i: (model_inputs[i].image is None, len(model_inputs[i].text)))
    fresh: dict[str, np.ndarray] = {}
    with tqdm(total=len(todo), desc="encoding", unit="input", disable=not show_progress) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            vectors = embedder.encode(
                [model_inputs[i] for i in chunk],
                batch_size=batch_size,
                show_progress=False,
                image_root=image_root,
            )
            if cache is not None:
                cache.add([keys[i] for i in chunk], vectors)
            else:
                fresh.update(zip((keys[i] for i in chunk), vectors, strict=True))
            bar.update(len(chunk))
    if cache is not None:
        cache.flush()
        embeddings = cache.get(keys)
    else:
        embeddings = np.stack([fresh[key] for key in keys]) if keys else np.zeros((0, 0), np.float32)
    stats = EncodeStats(len(todo), len(first) - len(todo), round(time.perf_counter() - started, 3))
    return Embedded(embeddings, items, fingerprint, stats)


def resolve_params(kind: str, params: dict[str, Any], n: int, dim: int | None = None) -> dict[str, int]:
    """The parameters of a ``kind`` index over ``n`` vectors, defaults filled in; ``dim`` None skips dim checks.

    Raises ``ValueError`` for an unknown kind or parameter, or for too few vectors to train an ``ivfpq`` index.
    """
    if kind not in KIND_PARAMS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
    allowed = KIND_PARAMS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        expected = ", ".join(allowed) or "none"
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for a {kind} index (it takes: {expected})"
        )
    resolved = {**allowed, **{key: value for key, value in params.items() if value is not None}}
    for key, value in resolved.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{kind} parameter {key} must be an integer >= 1, got {value!r}")
    if kind == "ivfpq":
        if resolved["nlist"] is None:
            resolved["nlist"] = min(max(1, round(4 * math.sqrt(n))), max(1, n // MIN_POINTS_PER_CENTROID))
        if resolved["nbits"] > 16:
            raise ValueError(f"ivfpq parameter nbits must be at most 16, got {resolved['nbits']}")
        needed = max(resolved["nlist"], 2 ** resolved["nbits"])
        if n < needed:
            raise ValueError(
                f"an ivfpq index trains nlist={resolved['nlist']} cells and 2**nbits={2 ** resolved['nbits']} "
                f"codes per sub-quantizer, so it needs at least {needed} vectors; got {n} (use a flat or hnsw "
                "index, or lower nlist / nbits)"
            )
        if dim is not None:
            if resolved["pq_m"] is None:
                resolved["pq_m"] = max(m for m in range(1, min(dim, 64) + 1) if dim % m == 0)
            if dim % resolved["pq_m"]:
                raise ValueError(f"ivfpq parameter pq_m={resolved['pq_m']} must divide the dim {dim}")
    return resolved


def _new_faiss_index(kind: str, dim: int, params: dict[str, int]) -> Any:
    faiss = import_faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
        return index
    # The factory's index owns its coarse quantizer: it lives and dies with the index.
    spec = f"IVF{params['nlist']},PQ{params['pq_m']}x{params['nbits']}"
    index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
    # The factory turns on polysemous training: only Hamming-filtered search uses it, and it made training a
    # 2000-vector index 40x slower.
    index.do_polysemous_training = False
    return index


def _train(index: Any, vectors: np.ndarray, params: dict[str, int]) -> None:
    """Train an ivfpq index on ``vectors``; few vectors get one warning here instead of faiss's one per
    sub-quantizer."""
    centroids = max(params["nlist"], 2 ** params["nbits"])
    if len(vectors) < MIN_POINTS_PER_CENTROID * centroids:
        logger.warning(
            "ivfpq: training %d centroids on %d vectors (faiss suggests %d); recall may suffer",
            centroids,
            len(vectors),
            MIN_POINTS_PER_CENTROID * centroids,
        )
    for clustering in (index.cp, index.pq.cp):
        clustering.min_points_per_centroid = 1  # only faiss's warning reads it
    index.train(vectors)


def _apply_search_params(index: Any, kind: str, params: dict[str, int]) -> None:
    """Search-time settings, applied after building and after loading."""
    if kind == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
    elif kind == "ivfpq":
        index.nprobe = params["nprobe"]


def _as_matrix(vectors: Any, dim: int | None, what: str) -> np.ndarray:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim != 2 or (dim is not None and matrix.shape[1] != dim):
        expected = f"(N, {dim})" if dim is not None else "(N, D)"
        raise ValueError(f"{what} must be a {expected} matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError(f"{what} hold NaN or infinite values")
    return matrix


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


class Index:
    """Rows of embeddings in a faiss index, with the id, text, image and source of each, and the model they came
    from (``model``, ``fingerprint``, ``coma_config``, ``dtype``; None for vectors of unknown origin)."""

    def __init__(self, faiss_index: Any, kind: str, params: dict[str, int], rows: Sequence[Row] = ()) -> None:
        if faiss_index.ntotal != len(rows):
            raise ValueError(f"{len(rows)} rows for a faiss index of {faiss_index.ntotal} vectors")
        self._faiss = faiss_index
        self.kind = kind
        self.params = dict(params)
        self.dim: int = faiss_index.d
        self.rows: list[Row] = []
        self._positions: dict[str, int] = {}
        self._check_new_rows(rows)
        self._record(rows)
        self.model: str | None = None
        self.fingerprint: str | None = None
        self.coma_config: dict | None = None
        self.dtype: str | None = None
        self.encode_stats: EncodeStats | None = None
        _apply_search_params(self._faiss, kind, self.params)

    def __len__(self) -> int:
        return len(self.rows)

    # -- building ---------------------------------------------------------------------------------------------

    @classmethod
    def from_embeddings(
        cls, embeddings: np.ndarray, rows: Sequence[Row] | None = None, *, kind: str = "flat", **params: int
    ) -> Index:
        """An index of precomputed (N, D) vectors (``coma encode`` output, say); rows default to ids "0".."N-1".

        Training (``ivfpq``) uses these vectors.
        """
        matrix = _as_matrix(embeddings, None, "embeddings")
        if not len(matrix):
            raise ValueError("no embeddings to index")
        rows = list(rows) if rows is not None else [Row(str(i)) for i in range(len(matrix))]
        if len(rows) != len(matrix):
            raise ValueError(f"{len(rows)} rows for {len(matrix)} embeddings")
        resolved = resolve_params(kind, params, len(matrix), matrix.shape[1])
        faiss_index = _new_faiss_index(kind, matrix.shape[1], resolved)
        index = cls(faiss_index, kind, resolved)
        index._check_new_rows(rows)
        if not faiss_index.is_trained:
            _train(faiss_index, matrix, resolved)
        faiss_index.add(matrix)
        index._record(rows)
        return index

    @classmethod
    def build(
        cls,
        embedder: Embedder,
        inputs: Sequence[Any],
        *,
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        kind: str = "flat",
        cache_dir: str | os.PathLike | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        image_root: str | os.PathLike | None = None,
        **params: int,
    ) -> Index:
        """Embed ``inputs`` (anything :meth:`Embedder.encode` takes) and index them; ids default to "0".."N-1".

        Kind, parameters and ids are checked before anything is encoded. ``cache_dir`` makes the build resumable
        (:func:`embed_inputs`); ``encode_stats`` says afterwards how much was encoded.
        """
        inputs = list(inputs)
        if not inputs:
            raise ValueError("no inputs to index")
        resolve_params(kind, params, len(inputs))
        ids, sources = _ids_and_sources(len(inputs), ids, sources, start=0)
        _check_unique(ids, sources, {}, [])
        embedded = embed_inputs(embedder, inputs, labels=sources, cache_dir=cache_dir, instruction=instruction,
                                batch_size=batch_size, show_progress=show_progress, image_root=image_root)  # fmt: skip
        index = cls.from_embeddings(
            embedded.embeddings, _rows(ids, sources, embedded.items), kind=kind, **params
        )
        index._set_model(embedder, embedded.fingerprint)
        index.encode_stats = embedded.stats
        return index

    def add(
        self,
        embedder: Embedder,
        inputs: Sequence[Any],
        *,
        ids: Sequence[str] | None = None,
        sources: Sequence[str] | None = None,
        cache_dir: str | os.PathLike | None = None,
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress: bool = True,
        image_root: str | os.PathLike | None = None,
    ) -> None:
        """Embed and append ``inputs``; ids default to their positions, must be new, and are checked first.

        The embedder must be the index's model (same fingerprint and coma config); an ``ivfpq`` index keeps its
        training.
        """
        from coma.eval.cache import model_fingerprint
        from coma.eval.runner import backbone_config

        inputs = list(inputs)
        if not inputs:
            raise ValueError("no inputs to add")
        ids, sources = _ids_and_sources(len(inputs), ids, sources, start=len(self))
        _check_unique(ids, sources, self._positions, self.rows)
        fingerprint = model_fingerprint(embedder.model, backbone_config(embedder))
        if self.fingerprint is not None:
            self._check_model(embedder, fingerprint)
        embedded = embed_inputs(embedder, inputs, labels=sources, cache_dir=cache_dir, instruction=instruction,
                                batch_size=batch_size, show_progress=show_progress, image_root=image_root,
                                fingerprint=fingerprint)  # fmt: skip
        self.add_embeddings(embedded.embeddings, _rows(ids, sources, embedded.items))
        self.encode_stats = embedded.stats

    def add_embeddings(self, embeddings: np.ndarray, rows: Sequence[Row]) -> None:
        """Append precomputed vectors and their rows (ids must be new)."""
        matrix = _as_matrix(embeddings, self.dim, "embeddings")
        rows = list(rows)
        if len(rows) != len(matrix):
            raise ValueError(f"{len(rows)} rows for {len(matrix)} embeddings")
        self._check_new_rows(rows)
        self._faiss.add(matrix)
        self._record(rows)

    def _check_new_rows(self, rows: Sequence[Row]) -> None:
        _check_unique([row.id for row in rows], [row.source for row in rows], self._positions, self.rows)

    def _record(self, rows: Sequence[Row]) -> None:
        for row in rows:
            self._positions[row.id] = len(self.rows)
            self.rows.append(row)

    # -- the model --------------------------------------------------------------------------------------------

    def _set_model(self, embedder: Embedder, fingerprint: str) -> None:
        name = str(embedder.model.backbone.name_or_path)
        self.model = os.path.abspath(name) if os.path.isdir(name) else name
        self.fingerprint = fingerprint
        self.coma_config = embedder.config.to_dict()
        self.dtype = str(next(embedder.model.parameters()).dtype).removeprefix("torch.")

    def load_embedder(
        self, model: str | os.PathLike | None = None, *, device: str | None = None, check: bool = True
    ) -> Embedder:
        """The index's model (or ``model``) loaded as the index was built: same dtype, pooling and pixel bounds, so
        queries land in the rows' space; ``check`` verifies that with :meth:`check_embedder`."""
        import torch

        from coma.embedder import Embedder

        model = model if model is not None else self.model
        if model is None:
            raise ValueError(
                "the index records no model (it was built from precomputed embeddings); name one"
            )
        if str(model) == self.model and os.path.isabs(model) and not os.path.isdir(model):
            raise FileNotFoundError(f"the index's model {model} is not there any more; name where it is now")
        config = self.coma_config or {}
        embedder = Embedder.from_pretrained(
            model,
            pooling=config.get("pooling"),
            min_pixels=config.get("min_pixels"),
            max_pixels=config.get("max_pixels"),
            device=device,
            dtype=getattr(torch, self.dtype) if self.dtype else None,
        )
        if check:
            self.check_embedder(embedder)
        return embedder

    def check_embedder(self, embedder: Embedder) -> None:
        """Raise ``ValueError`` unless ``embedder`` is the model the index was built with (weights, dtype, coma
        config); queries of another model land in an unrelated space. Hashes the weights once (seconds for 7B)."""
        from coma.eval.cache import model_fingerprint
        from coma.eval.runner import backbone_config

        if self.fingerprint is None:
            raise ValueError("the index records no model (it was built from precomputed embeddings)")
        self._check_model(embedder, model_fingerprint(embedder.model, backbone_config(embedder)))

    def _check_model(self, embedder: Embedder, fingerprint: str) -> None:
        name = embedder.model.backbone.name_or_path
        dtype = str(next(embedder.model.parameters()).dtype).removeprefix("torch.")
        if fingerprint != self.fingerprint:
            detail = f"; it was built in {self.dtype}, this model is {dtype}" if dtype != self.dtype else ""
            raise ValueError(
                f"model {name} (fingerprint {fingerprint[:12]}) is not the model the index was built with: "
                f"{self.model} (fingerprint {self.fingerprint[:12]}){detail}"
            )
        config = embedder.config.to_dict()
        if config != self.coma_config:
            changed = sorted(
                key for key in {*config, *self.coma_config} if config.get(key) != self.coma_config.get(key)
            )
            raise ValueError(
                f"model {name} has another coma config than the index was built with (differs in: "
                f"{', '.join(changed)})"
            )

    # -- searching --------------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[SearchHit]]:
        """The ``k`` best rows of each query of a (Q, D) float32 matrix, best first; fewer when the index is
        smaller."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        matrix = _as_matrix(queries, self.dim, "queries")
        if not len(self):
            return [[] for _ in range(len(matrix))]
        scores, positions = self._faiss.search(matrix, min(k, len(self)))
        results = []
        for row_scores, row_positions in zip(scores.tolist(), positions.tolist(), strict=True):
            hits: list[SearchHit] = []
            for score, position in zip(row_scores, row_positions, strict=True):
                # faiss marks missing results with -1 (an hnsw or ivfpq search can find fewer than k).
                if position >= 0:
                    row = self.rows[position]
                    hits.append(SearchHit(len(hits) + 1, score, row.id, row.text, row.image, row.source))
            results.append(hits)
        return results

    def search_inputs(
        self,
        embedder: Embedder,
        inputs: Sequence[Any],
        k: int = 10,
        instruction: str | None = None,
        image_root: str | os.PathLike | None = None,
    ) -> list[list[SearchHit]]:
        """Encode query inputs with ``embedder`` (not checked against the index's model: see
        :meth:`check_embedder`) and search."""
        queries = embedder.encode(inputs, instruction=instruction, show_progress=False, image_root=image_root)
        return self.search(queries, k)

    # -- files ------------------------------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """What ``index.json`` records."""
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": self.params,
            "dim": self.dim,
            "count": len(self),
            "metric": "ip",
            "model": self.model,
            "model_fingerprint": self.fingerprint,
            "coma_config": self.coma_config,
            "dtype": self.dtype,
            "created_with": _versions(),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``index.faiss``, ``rows.jsonl`` and (last) ``index.json`` into ``folder``, each atomically."""
        faiss = import_faiss()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / FAISS_FILE, faiss.serialize_index(self._faiss).tobytes())
        write_jsonl(folder / ROWS_FILE, (asdict(row) for row in self.rows))
        write_json(folder / META_FILE, self.metadata())
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Index:
        """Read an index folder written by :meth:`save`; counts, dims and ids must agree between its files."""
        faiss = import_faiss()
        folder = Path(folder)
        meta_path, faiss_path, rows_path = folder / META_FILE, folder / FAISS_FILE, folder / ROWS_FILE
        for path in (meta_path, faiss_path, rows_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {folder} is not an index written by coma index")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{meta_path}: not valid JSON ({error.msg})") from None
        missing = [key for key in ("format_version", "kind", "params", "dim", "count") if key not in meta]
        if missing:
            raise ValueError(f"{meta_path}: missing field(s) {', '.join(missing)}")
        if meta["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version {meta['format_version']} is not {FORMAT_VERSION}, the one this coma "
                "reads"
            )
        if meta["kind"] not in KINDS:
            raise ValueError(f"{meta_path}: unknown index kind {meta['kind']!r}")
        try:
            faiss_index = faiss.deserialize_index(np.fromfile(faiss_path, dtype=np.uint8))
        except RuntimeError as error:
            raise ValueError(f"{faiss_path}: not a faiss index ({str(error).splitlines()[0]})") from None
        rows = [_read_row(rows_path, line_number, obj) for line_number, obj in iter_jsonl(rows_path)]
        if not len(rows) == faiss_index.ntotal == meta["count"]:
            raise ValueError(
                f"{folder}: {rows_path.name} has {len(rows)} rows, {faiss_path.name} {faiss_index.ntotal} vectors "
                f"and {meta_path.name} says {meta['count']}; the folder is inconsistent (rebuild it)"
            )
        if faiss_index.d != meta["dim"]:
            raise ValueError(f"{faiss_path}: dim {faiss_index.d}, but {meta_path.name} says {meta['dim']}")
        try:
            index = cls(faiss_index, meta["kind"], meta["params"], rows)
        except ValueError as error:
            raise ValueError(f"{rows_path}: {error}") from None
        index.model = meta.get("model")
        index.fingerprint = meta.get("model_fingerprint")
        index.coma_config = meta.get("coma_config")
        index.dtype = meta.get("dtype")
        return index


def _ids_and_sources(
    n: int, ids: Sequence[Any] | None, sources: Sequence[str] | None, start: int
) -> tuple[list[str], list[str]]:
    """Ids as strings (default: positions from ``start``) and sources (default: "")."""
    for name, values in (("ids", ids), ("sources", sources)):
        if values is not None and len(values) != n:
            raise ValueError(f"{len(values)} {name} for {n} inputs")
    return (
        [str(value) for value in ids] if ids is not None else [str(start + i) for i in range(n)],
        [str(value) for value in sources] if sources is not None else [""] * n,
    )


def _check_unique(
    ids: Sequence[str], sources: Sequence[str], known: dict[str, int], rows: Sequence[Row]
) -> None:
    """Raise naming both places if an id repeats within ``ids`` or is already a key of ``known`` (row positions)."""
    seen: dict[str, int] = {}
    for i, id_ in enumerate(ids):
        here = sources[i] or f"input {i}"
        if id_ in known:
            row = rows[known[id_]]
            there = f"row {known[id_]}" + (f" ({row.source})" if row.source else "")
            raise ValueError(f"duplicate id {id_!r}: {here} and {there} of the index")
        if id_ in seen:
            there = sources[seen[id_]] or f"input {seen[id_]}"
            raise ValueError(f"duplicate id {id_!r}: {there} and {here}")
        seen[id_] = i


def _rows(ids: Sequence[str], sources: Sequence[str], items: Sequence[EncodeInput]) -> list[Row]:
    def image_name(image: Any) -> str:
        if image is None:
            return ""
        return PIL_IMAGE if isinstance(image, Image.Image) else str(image)

    return [
        Row(id_, item.text, image_name(item.image), source)
        for id_, source, item in zip(ids, sources, items, strict=True)
    ]


def _read_row(path: Path, line_number: int, obj: dict) -> Row:
    fields = ("id", "text", "image", "source")
    bad = [key for key in fields if not isinstance(obj.get(key), str)]
    if bad or set(obj) - set(fields):
        raise ValueError(f"{path}:{line_number}: expected string fields {', '.join(fields)} and no others")
    return Row(**obj)


__all__ = ["Embedded", "EncodeStats", "Index", "Row", "SearchHit", "embed_inputs", "import_faiss"]
