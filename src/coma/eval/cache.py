"""An on-disk embedding cache that makes evaluation resumable and never reuses rows of another model.

Layout: ``CACHE_DIR/<digest>/`` where ``digest`` hashes the model fingerprint and the template (everything besides
the weights that changes an embedding: the coma config, dtype, image block, processor pixel bounds, tokenizer
size). A different model or template therefore reads and writes a different folder, and stale rows cannot be
found. Inside, each shard is one ``.npz`` with ``keys`` (per-input keys) and ``embeddings`` (float32 rows),
written to a temporary file and renamed, so a killed run leaves only complete shards behind. Shard names carry
the writer's rank and a random suffix, so ranks and resumed runs never overwrite one another. ``np.savez`` stores
members uncompressed, so :meth:`EmbeddingCache.get` memory-maps a shard's rows and reads only the rows it is asked
for: scoring one dataset at a time never loads the whole benchmark's embeddings.

**Model fingerprint.** We hash the weights the embedder actually holds (every ``state_dict`` tensor: name, dtype,
shape and all bytes, SHA-256) plus the backbone config, rather than the files of the model folder. This covers
models that exist only in memory (the demo evaluates right after training), hub ids, LoRA adapters and the
compression rows added to a plain VLM, and it changes with the load dtype. The cost is one pass over the weights:
about 750 MB/s per core here, so ~10 s for a 7B bf16 model on a few cores; tensors are hashed in threads (hashlib
releases the GIL).

**Input key.** SHA-256 of the formatted text, the image path as written, and the image file's size and
modification time (so a replaced image is re-encoded). The dataset's format rule is applied before keying, so the
key holds its output rather than its version.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coma.io import atomic_open, write_json

SHARD_SUFFIX = ".npz"
META_NAME = "meta.json"
_KEY_BYTES = 16


def _tensor_digest(item: tuple[str, torch.Tensor]) -> bytes:
    name, tensor = item
    tensor = tensor.detach()
    header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
    # A uint8 view gives the raw bytes of any dtype (numpy has no bfloat16).
    data = tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy()
    digest = hashlib.sha256(header)
    digest.update(memoryview(data))
    return digest.digest()


def model_fingerprint(model: torch.nn.Module, backbone_config: dict[str, Any] | None = None) -> str:
    """SHA-256 over every ``state_dict`` tensor (name, dtype, shape, bytes) and the backbone config."""
    items = sorted(model.state_dict().items())
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, items))
    total = hashlib.sha256()
    for digest in digests:
        total.update(digest)
    if backbone_config is not None:
        total.update(json.dumps(backbone_config, sort_keys=True, default=str).encode())
    return total.hexdigest()


def input_key(text: str, image: str, image_stat: tuple[int, int] | None) -> str:
    """Key of one (formatted text, image path) input; ``image_stat`` is the file's (size, mtime_ns)."""
    payload = json.dumps([text, image, list(image_stat) if image_stat else None], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[: 2 * _KEY_BYTES]


def _stored_member_memmap(archive_path: Path, member: str) -> np.memmap | None:
    """A memory map of an ``.npy`` member stored uncompressed in a zip (what ``np.savez`` writes), or None."""
    with zipfile.ZipFile(archive_path) as archive:
        info = archive.getinfo(member)
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    with open(archive_path, "rb") as handle:
        # The data follows the local file header, whose extra field may differ from the central directory's.
        handle.seek(info.header_offset)
        local = handle.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            return None
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(handle)
        offset = handle.tell()
    if dtype.hasobject or 0 in shape:
        return None
    return np.memmap(
        archive_path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"
    )


def cache_digest(fingerprint: str, template: dict[str, Any]) -> str:
    payload = json.dumps({"model": fingerprint, "template": template}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class EmbeddingCache:
    """Embeddings of one model + template, keyed by :func:`input_key`, stored as atomically written shards.

    ``add`` buffers rows; every ``flush_every`` calls (batches) they go to a new shard. ``refresh`` picks up shards
    written by other processes (ranks) since the last look.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        fingerprint: str,
        template: dict[str, Any],
        rank: int = 0,
        flush_every: int = 8,
    ) -> None:
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.fingerprint = fingerprint
        self.folder = Path(root) / cache_digest(fingerprint, template)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / META_NAME
        if not meta.is_file():
            # For people looking at the folder; the folder name is what keys the cache.
            write_json(meta, {"model_fingerprint": fingerprint, "template": template})
        self.rank = rank
        self.flush_every = flush_every
        self._index: dict[str, tuple[Path, int]] = {}
        self._seen: set[Path] = set()
        self._pending_keys: list[str] = []
        self._pending_rows: list[np.ndarray] = []
        self._pending_batches = 0
        self.shards_written = 0
        self.refresh()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def refresh(self) -> None:
        """Index shards that appeared since the last call (temporary files never match the suffix)."""
        for shard in sorted(self.folder.glob(f"*{SHARD_SUFFIX}")):
            if shard in self._seen:
                continue
            for row, key in enumerate(self._read(shard, "keys")["keys"].tolist()):
                self._index.setdefault(key, (shard, row))
            self._seen.add(shard)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if key not in self._index]

    def add(self, keys: Sequence[str], embeddings: np.ndarray) -> None:
        """Buffer one encoded batch; writes a shard every ``flush_every`` batches."""
        if len(keys) != len(embeddings):
            raise ValueError(f"{len(keys)} keys for {len(embeddings)} embeddings")
        self._pending_keys.extend(keys)
        self._pending_rows.append(np.asarray(embeddings, dtype=np.float32))
        self._pending_batches += 1
        if self._pending_batches >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered rows as one shard (atomically) and index them."""
        if not self._pending_keys:
            return
        keys = np.array(self._pending_keys)
        rows = np.concatenate(self._pending_rows)
        shard = self.folder / f"r{self.rank:03d}-{uuid.uuid4().hex[:12]}{SHARD_SUFFIX}"
        with atomic_open(shard, "wb") as handle:
            np.savez(handle, keys=keys, embeddings=rows)
        for row, key in enumerate(keys.tolist()):
            self._index.setdefault(key, (shard, row))
        self._seen.add(shard)
        self._pending_keys, self._pending_rows, self._pending_batches = [], [], 0
        self.shards_written += 1

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """The (N, D) float32 rows of ``keys``, in order; every key must be present."""
        absent = self.missing(keys)
        if absent:
            raise KeyError(f"{len(absent)} inputs are not in the cache {self.folder} (first: {absent[0]})")
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self._index[key]
            by_shard.setdefault(shard, []).append((position, row))
        result: np.ndarray | None = None
        for shard, pairs in by_shard.items():
            rows = self._embeddings(shard)
            if result is None:
                result = np.empty((len(keys), rows.shape[1]), dtype=np.float32)
            positions, indices = (np.array(column) for column in zip(*pairs, strict=True))
            result[positions] = rows[indices]
        return result if result is not None else np.zeros((0, 0), dtype=np.float32)

    @classmethod
    def _embeddings(cls, shard: Path) -> np.ndarray:
        """A shard's embedding rows, memory-mapped when possible, else read whole."""
        try:
            rows = _stored_member_memmap(shard, "embeddings.npy")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
            rows = None  # _read names the shard in its error
        return rows if rows is not None else cls._read(shard)["embeddings"]

    @staticmethod
    def _read(shard: Path, *names: str) -> dict[str, np.ndarray]:
        """Read members of a shard (all by default); npz members load lazily, so keys alone are cheap."""
        names = names or ("keys", "embeddings")
        try:
            with np.load(shard, allow_pickle=False) as data:
                arrays = {name: data[name] for name in names}
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(
                f"cache shard {shard} is unreadable ({error}); delete it to re-encode its rows"
            ) from None
        if len(names) == 2 and len(arrays["keys"]) != len(arrays["embeddings"]):
            raise ValueError(
                f"cache shard {shard}: {len(arrays['keys'])} keys but {len(arrays['embeddings'])} rows"
            )
        return arrays
