"""Per-GPU training memory of coma's recipes, measured with fake tensors on the CPU (no GPU, no weights).

What runs: one optimizer step of coma's own training code (``CompressTask`` / ``MatchTask`` and their ``step``,
``coma.train.parallel.parallelize``, then ``clip_grad_norm`` and AdamW as ``coma.train.loop.train`` runs them) on
a model with the released widths and depths of Qwen2.5-VL-3B / -7B (``coma.backbones.tiny.real_shape_config``: 36 / 28
LM layers, 32 ViT blocks), built in bf16 and loaded through ``Embedder.from_pretrained`` as a real checkpoint is, with
the recipes' settings (configs/compress_qwen2_5_vl_*.yaml, match_qwen2_5_vl_*.yaml):

* stage 1: 2 micro-batches of one conversation each (the first under ``no_sync``, like the first 31 of the
  recipe's 32), each an 896 x 896 image (1024 visual tokens), the compression prompt, T = 32 compression tokens and a
  7-turn dialogue of 527 tokens: 1596 tokens;
* stage 2: GradCache over 2 query chunks and 2 target chunks of the recipe's size (8 for the 3B, 4 for the 7B):
  queries an MMEB-style instruction with an 896 x 896 image, targets a short caption;
* the AdamW state (``foreach=True``, as torch picks on CUDA) is allocated before the step, as every step after the
  first finds it, so the peak is the one every later step repeats.

Grid: LoRA/DoRA (r16 on the LM's q/k/v/o + the compression rows) or full fine-tuning of the LM (``full_finetune``;
the vision tower is frozen in both), activation checkpointing on or off, DDP or FSDP2 over 8 ranks (gradient sync
deferred to the step's last backward, coma's default).

How. ``load_backbone`` builds the model under a ``FakeTensorMode``: every weight and activation is a fake tensor with
a shape, a dtype and a storage size but no data, so a 7B model costs nothing to build. Tensors computed from the
inputs alone (token ids, masks, M-RoPE position ids, window indices of the ViT) stay real, so the data-dependent
Python of the transformers model runs as on a GPU; a scalar read of a fake value (the logged loss, the gradient
norm) returns 0. torch's ``MemTracker`` (``FSDPMemTracker`` for FSDP, with a ``fake`` process group standing for the
7 other ranks) adds up the bytes of every live tensor storage after every operation and keeps the breakdown at the
peak: parameters (FSDP: own shards + all-gathered units), gradients (FSDP: sharded and unsharded accumulators,
reduce-scatter buffers), optimizer state, activations (with backward's temporaries, which under FSDP include
gradients not yet reduce-scattered). DDP runs the step in one process (``parallelize``'s one-process path, which
DDP wraps) with its gradient buckets: coma builds DDP with ``gradient_as_bucket_view=True``, so the gradients are
views of the buckets, allocated once and held for the whole run; the step keeps them allocated from its start and
zeroes them in place. The collated batches are prepared before tracking: host memory on a GPU run.

Measured at full depth; two things are extrapolated linearly. Stage 2 holds the caches of every GradCache chunk's
no-grad pass (each query chunk's image features, the embeddings) until the step ends: what one more chunk per side
adds to the memory held at the first replay, measured between 2 and 3 chunks per side at 2 LM layers x 2 ViT blocks,
is added for the recipe's 1024 / 8 ranks / chunk size chunks per side (16 for the 3B, 32 for the 7B). With ``--fit``
the depth is extrapolated too (measured at 2 x 2, 4 x 2 and 2 x 4 LM layers x ViT blocks, a slope per layer and per
block, each category on its own): 3-4 x faster, and within 0.4 GiB of the direct measurement on the rows checked
(3B stage-1 DoRA DDP 9.0 / 9.0, stage-2 DoRA FSDP 5.4 / 5.3, stage-1 full FSDP 18.9 / 18.5), but the peak can move
to another moment of the step as depth grows, which a line through shallow models does not see; the default
measures the released depth directly. Python's cyclic garbage collector runs before every forward of the
step (some autograd nodes end in reference cycles and are freed only by it), so that a run's peak does not depend
on what the process ran before.

Not counted: the CUDA context and kernels (~0.5-1 GB per process), the caching allocator's fragmentation and
reserved-but-free blocks, NCCL buffers, cuBLAS / attention workspaces, FSDP's overlap (the next unit's all-gather
runs on another stream while the current one computes; here operations run one after another), and anything
outside tensors. Attention runs through SDPA's CPU flash kernel, which like the CUDA flash / memory-efficient /
FlexAttention kernels keeps O(L) per head for backward, never L x L weights. Read the peak as a lower bound on what
``torch.cuda.max_memory_allocated`` reports, and keep a few GB of head-room.

    .venv/bin/python scripts/bench_memory.py [--quick] [--sizes 3b,7b] [--modes lora,full] [--strategies ddp,fsdp]
                                             [--checkpointing on,off] [--stages 1,2] [--fit] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: E402
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

aten = torch.ops.aten
GIB = 2**30
SIZES = {"3b": "qwen2.5-vl-3b", "7b": "qwen2.5-vl-7b"}
# Released depths (LM layers, ViT blocks), the recipes' GradCache chunk size and global batch.
FULL_DEPTH = {"qwen2.5-vl-3b": (36, 32), "qwen2.5-vl-7b": (28, 32)}
CHUNK_SIZE = {"qwen2.5-vl-3b": 8, "qwen2.5-vl-7b": 4}
STAGE2_GLOBAL_BATCH = 1024
# --fit: (LM layers, ViT blocks) measured: the base point, one more LM step, one more ViT step.
FIT_DEPTHS = ((2, 2), (4, 2), (2, 4))
QUESTION = "What is shown in the picture, where was it taken and what are the main colours?"
ANSWER = (
    "A busy street in the city at night with people walking past shops, a red bus waiting at the stop and tall "
    "buildings with lit windows; the sign above the door says stop and the sky is dark blue with a few clouds. "
)
QUERY_TEXT = "<|image_1|>\nRepresent the given image with the following question: What is in the image?"
TARGET_TEXT = "A red bus waiting at a stop on a busy city street at night."


# ---------------------------------------------------------------------------------------------------------------
# Fake tensors for the weights, real ones for what the inputs alone decide


class HybridFakeMode(FakeTensorMode):
    """A ``FakeTensorMode`` in which operations without a fake input run for real.

    Weights (and so every activation) are fake; token ids, masks, position ids and the ViT's window indices depend
    on the inputs only and stay real, so the model's data-dependent Python (``tolist``, boolean indexing on masks)
    works. Factories: integer / bool and tiny float tensors are real (indices, counters), larger float ones fake
    (activation-sized buffers); ``real_float_limit`` widens that while adapters are created (peft moves new LoRA
    weights with ``.to()``, which fake parameters do not allow). Reading a fake scalar (``.item()``) returns 0.
    """

    def __init__(self) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.all_fake = False
        self.real_float_limit = 4096
        self.scalar_reads = 0
        self.nested = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        has_fake = any(isinstance(t, FakeTensor) for t in flat)
        # Inside a fake operation (its decomposition calls factories too) everything stays fake.
        if not has_fake and not self.all_fake and not self.nested:
            if any(isinstance(t, torch.Tensor) for t in flat) or func is aten.lift_fresh.default:
                return func(*args, **kwargs)
            fake_out = super().__torch_dispatch__(func, types, args, kwargs)
            outputs = [t for t in tree_flatten(fake_out)[0] if isinstance(t, torch.Tensor)]
            if all(not t.is_floating_point() or t.numel() <= self.real_float_limit for t in outputs):
                return func(*args, **kwargs)
            return fake_out
        if has_fake and func is aten._local_scalar_dense.default:
            self.scalar_reads += 1
            tensor = args[0]
            return False if tensor.dtype == torch.bool else 0.0 if tensor.is_floating_point() else 0
        if has_fake and func is aten.index.Tensor and _has_real_mask(args[1]):
            # hidden[mask] with a real boolean mask: index with its (real) positions, a static shape.
            indices = []
            for index in args[1]:
                if _is_real_mask(index):
                    indices.extend(index.nonzero().unbind(1))
                else:
                    indices.append(index)
            args = (args[0], indices)
        self.nested += 1
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.nested -= 1


def _is_real_mask(index: Any) -> bool:
    return isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor) and index.dtype == torch.bool


def _has_real_mask(indices: Any) -> bool:
    return any(_is_real_mask(index) for index in indices)


# ---------------------------------------------------------------------------------------------------------------
# Trackers: only the global peak (the per-module peaks cost O(modules) per operation), frozen weights allowed, and
# one module called several times per step (GradCache's chunks, stage 1's micro-batches)


class _PeakOnly:
    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)
                self.peak_phase = (
                    "optimizer" if self._in_opt else "backward" if self._mod_tracker.is_bw else "forward"
                )
                self.peak_where = max(self._mod_tracker.parents, key=len)


class Tracker(_PeakOnly, MemTracker):
    def _track_module_params_and_buffers(
        self, module: nn.Module, install_grad_hooks: bool = True
    ) -> tuple[int, int]:
        # MemTracker puts a gradient hook on every parameter, which a frozen one refuses.
        def grad_hook(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        param_memory = buffer_memory = 0
        for param in module.parameters():
            infos = self._update_and_maybe_create_winfos(param, _MemRefType.PARAM)
            param_memory += sum(info.mem_consumed for info in infos)
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(grad_hook),
                    param.register_post_accumulate_grad_hook(lambda p: grad_hook(p.grad)),
                )
        for buffer in module.buffers():
            infos = self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER)
            buffer_memory += sum(info.mem_consumed for info in infos)
        return param_memory, buffer_memory

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        with contextlib.suppress(NotImplementedError):  # a root module called again within the step
            super()._pre_fw_hook(module, inputs)


class FSDPTracker(_PeakOnly, FSDPMemTracker):
    def _fsdp_param_group_post_backward(self, fsdp_mod: Any, orig: Any) -> Any:
        # Under set_requires_gradient_sync(False) FSDP keeps each unit's unsharded gradient (upcast to the reduce
        # dtype) until the synchronised backward; FSDPMemTracker would leave it among the temporaries.
        inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig)

        def post_backward(*args: Any, **kwargs: Any) -> None:
            inner(*args, **kwargs)
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group else ():
                for grad in (fsdp_param.unsharded_accumulated_grad, fsdp_param._unsharded_param.grad):
                    if grad is not None:
                        self._update_and_maybe_create_winfos(grad, _FSDPRefType.UNSHARDED_GRAD)

        return post_backward


class Outer(nn.Module):
    """Calls the trained module (so that FSDPMemTracker does not take its second call in a step for a new step).

    Before every call it runs Python's cyclic garbage collector: some autograd nodes of the step sit in reference
    cycles, and with collections at fixed points the automatic ones fall at the same allocation counts in every
    run, so the peak no longer depends on what the process did before. At the first
    call with gradients (GradCache's first replay, stage 1's first micro-batch) it records in ``held`` the bytes
    the tracker holds: for stage 2 the model, the optimizer and the caches of every chunk's no-grad pass.
    """

    def __init__(self, inner: nn.Module, tracker: MemTracker) -> None:
        super().__init__()
        self.inner = inner
        self.tracker = tracker
        self.held: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        gc.collect()
        if self.held is None and torch.is_grad_enabled():
            self.held = sum(snapshot["Total"] for snapshot in self.tracker.get_tracker_snapshot().values())
        return self.inner(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# One measurement


@dataclass(frozen=True)
class Setup:
    """One configuration. ``model``: a real shape (``qwen2.5-vl-3b``) or a model folder (tiny models in tests)."""

    model: str
    stage: int
    full: bool = False
    strategy: str = "ddp"
    checkpointing: bool = True
    layers: int | None = None
    vision_layers: int | None = None
    world_size: int = 8
    visual_tokens: int = 1024
    turns: int = 7
    micro_batches: int = 2
    chunk_size: int = 8
    chunks: int = 2
    num_tokens: int = 32


@dataclass
class Memory:
    """Bytes at the peak of the step, by category; ``phase`` and ``where`` (innermost module) say when it fell."""

    params: float
    grads: float
    optimizer: float
    activations: float
    peak: float
    phase: str = ""
    where: str = ""
    seconds: float = 0.0
    tokens: int = 0
    held: float = 0.0
    categories: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A ``fake`` process group of ``world_size`` ranks, this process rank 0 (collectives do nothing)."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise RuntimeError("a process group of another size is already initialised")
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_config(setup: Setup) -> tuple[Any, Any, Any]:
    """(transformers config at the setup's depth, processor, adapter) of a real shape or a model folder."""
    from coma.backbones import ADAPTERS, adapter_for, read_model_type
    from coma.backbones.tiny import (
        REAL_SHAPES,
        build_processor,
        build_qwen_tokenizer,
        full_attention_blocks,
        real_shape_config,
    )

    if setup.model in REAL_SHAPES:
        family = REAL_SHAPES[setup.model].family
        layers, vision_layers = FULL_DEPTH.get(setup.model, (None, None))
        config = real_shape_config(setup.model, setup.layers or layers, setup.vision_layers or vision_layers)
        processor = _cached(
            ("processor", family), lambda: build_processor(family, build_qwen_tokenizer(family), real=True)
        )
        # Shared between runs: Embedder.from_pretrained adds the compression tokens to its tokenizer once.
        return config, processor, ADAPTERS[family]
    from transformers import AutoConfig

    adapter = adapter_for(read_model_type(setup.model))
    config = AutoConfig.from_pretrained(setup.model)
    data = config.to_dict()
    for text in (data, data.get("text_config") or {}):
        if setup.layers and "num_hidden_layers" in text:
            text["num_hidden_layers"] = setup.layers
            text.pop("layer_types", None)  # derived from the depth again
    vision = data["vision_config"]
    if setup.vision_layers:
        vision["depth"] = setup.vision_layers
        if vision.get("fullatt_block_indexes") is not None:
            vision["fullatt_block_indexes"] = full_attention_blocks(setup.vision_layers)
    return type(config).from_dict(data), adapter.load_processor(setup.model), adapter


_CACHE: dict[Any, Any] = {}


def _cached(key: Any, build: Any) -> Any:
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _image(side: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def _settings(cls: type, **values: Any) -> Any:
    """``cls(**values)`` for the fields ``cls`` has (settings differ between coma versions)."""
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in names})


def measure(setup: Setup) -> Memory:
    """Run one optimizer step of ``setup`` under fake tensors and return its peak memory on rank 0."""
    started = time.perf_counter()
    with fake_process_group(setup.world_size), tempfile.TemporaryDirectory() as folder:
        return _measure(setup, Path(folder), started)


def _measure(setup: Setup, folder: Path, started: float) -> Memory:
    import coma.embedder
    from coma.backbones.attention import load_with_attention
    from coma.train.loop import DistInfo
    from coma.train.parallel import parallelize

    model_config, processor, adapter = _model_config(setup)
    mode = HybridFakeMode()

    def fake_load_backbone(
        name_or_path: Any, *, dtype: torch.dtype, attn_implementation: Any, **_: Any
    ) -> Any:
        # What Embedder.from_pretrained loads, built from the config with fake weights instead of read.
        mode.all_fake = True
        try:
            backbone = load_with_attention(
                lambda implementation: adapter.model_class._from_config(
                    model_config, dtype=dtype, attn_implementation=implementation
                ),
                attn_implementation,
                adapter.vision_tower,
            )
        finally:
            mode.all_fake = False
        return backbone, processor, adapter

    # The image has exactly ``visual_tokens``; the pixel bounds are the recipes' (256-1024 tokens) scaled to it, so
    # coma's 56-px dummy image (stage 2 under FSDP) gets a quarter of them.
    side = (
        processor.image_processor.patch_size
        * processor.image_processor.merge_size
        * math.isqrt(setup.visual_tokens)
    )
    _image(side).save(folder / "image.png")
    dist_info = DistInfo(rank=0, world_size=setup.world_size, local_rank=0, device=torch.device("cpu"))
    strategy = setup.strategy if setup.world_size > 1 else "ddp"
    import coma.train.setup

    make_trainable = coma.train.setup.make_trainable

    def make_trainable_with_real_adapters(*args: Any, **kwargs: Any) -> Any:
        # peft moves the LoRA weights it creates with .to(), which fake parameters refuse: create them real.
        mode.real_float_limit = 1 << 24
        try:
            return make_trainable(*args, **kwargs)
        finally:
            mode.real_float_limit = HybridFakeMode().real_float_limit

    with mode, contextlib.redirect_stdout(io.StringIO()):
        with (
            mock.patch.object(coma.embedder, "load_backbone", fake_load_backbone),
            mock.patch.object(coma.train.setup, "make_trainable", make_trainable_with_real_adapters),
            mock.patch.object(nn.Module, "to", _to_unless_there),
        ):
            task = (_compress_task if setup.stage == 1 else _match_task)(
                setup, folder, side, strategy, dist_info
            )
        module = task.module
        # DDP: the one-process path of parallelize (what DDP wraps).
        parallel = parallelize(
            module, strategy=strategy, world_size=setup.world_size if strategy == "fsdp" else 1,
            device=torch.device("cpu"), compute_dtype=torch.bfloat16, shard_units=task.shard_units,
        )  # fmt: skip
        parameters = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=5e-5, weight_decay=0.0, foreach=True)
        for parameter in parameters:  # allocate the AdamW state, as every step after the first finds it
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        # DDP's buckets (the gradients' storage under gradient_as_bucket_view) stay allocated between steps.
        ddp_buckets = strategy == "ddp" and setup.world_size > 1
        optimizer.zero_grad(set_to_none=not ddp_buckets)
        if strategy == "fsdp":
            tracker: MemTracker = FSDPTracker(module, optimizer)
        else:
            tracker = Tracker()
            tracker.track_external(module, optimizer)
        tracker.peak_phase = tracker.peak_where = ""
        autocast = getattr(parallel, "autocast", contextlib.nullcontext)
        module.train()
        # The step's collated batches are host memory (on a GPU run each chunk is copied over when it runs, and
        # the copies hold ids, masks and pixels that the backward peak no longer needs): prepared untracked.
        if hasattr(task, "batches"):
            prepared = task.batches.next()
            task.batches.next = lambda: prepared
        outer = Outer(module, tracker)
        gc.collect()
        with tracker:
            # The body of coma.train.loop.train (whose set_to_none leaves DDP's bucket views allocated).
            optimizer.zero_grad(set_to_none=not ddp_buckets)
            with autocast():
                result = task.step(outer, parallel.no_sync)
            parallel.clip_grad_norm(parameters, 1.0)
            optimizer.step()
    memory = _summarise(tracker, result.tokens, time.perf_counter() - started)
    memory.held = outer.held or 0.0
    return memory


_MODULE_TO = nn.Module.to


def _to_unless_there(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """``Module.to`` that returns the module itself for a move to the device it is on (fake weights cannot be
    swapped for themselves, which is what ``_apply`` does with them)."""
    if len(args) == 1 and not kwargs and isinstance(args[0], (str, torch.device)):
        device = torch.device(args[0])
        tensors = [*module.parameters(), *module.buffers()]
        if all(t.device.type == device.type for t in tensors):
            return module
    return _MODULE_TO(module, *args, **kwargs)


def _train_settings(setup: Setup, strategy: str, global_batch_size: int, **values: Any) -> Any:
    from coma.train.config import TrainSettings

    return _settings(
        TrainSettings, global_batch_size=global_batch_size, max_steps=1, dtype="bfloat16", strategy=strategy,
        gradient_checkpointing=setup.checkpointing, show_progress=False, num_workers=0, **values,
    )  # fmt: skip


def _lora(setup: Setup) -> Any:
    from coma.train.config import LoraSettings

    return LoraSettings(r=16, alpha=64, dropout=0.1, dora=True, init="gaussian", full_finetune=setup.full)


def _compress_task(setup: Setup, folder: Path, side: int, strategy: str, dist_info: Any) -> Any:
    """coma's stage-1 task over copies of one conversation: an image and ``turns`` question-answer turns."""
    from coma.train.compress import CompressConfig, CompressTask

    human = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": ANSWER}]
    turns = human + [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ANSWER}] * (
        setup.turns - 1
    )
    count = setup.micro_batches * setup.world_size
    rows = [{"id": str(i), "image": "image.png", "conversations": turns} for i in range(count)]
    (folder / "conversations.jsonl").write_text(
        "".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8"
    )
    config = CompressConfig(
        model=setup.model, data=[str(folder / "conversations.jsonl")], image_root=str(folder),
        out=str(folder / "out"), num_tokens=setup.num_tokens, max_length=8192, min_pixels=side * side // 4,
        max_pixels=side * side, train=_train_settings(setup, strategy, count, micro_batch_size=1), lora=_lora(setup),
    )  # fmt: skip
    return CompressTask(config, dist_info)


def _match_task(setup: Setup, folder: Path, side: int, strategy: str, dist_info: Any) -> Any:
    """coma's stage-2 task over copies of one pair: image query, text target, ``chunks`` chunks per side."""
    from coma.train.match import MatchConfig, MatchTask

    count = setup.chunk_size * setup.chunks * setup.world_size
    subset = folder / "Bench"
    subset.mkdir()
    row = {"qry": QUERY_TEXT, "qry_image_path": "image.png", "pos_text": TARGET_TEXT, "pos_image_path": "",
           "neg_text": "", "neg_image_path": ""}  # fmt: skip
    (subset / "original.jsonl").write_text((json.dumps(row) + "\n") * count, encoding="utf-8")
    config = MatchConfig(
        model=setup.model, data=str(folder), image_root=str(folder), out=str(folder / "out"), block_size=1,
        num_tokens=setup.num_tokens, pooling="mean", query_chunk_size=setup.chunk_size,
        target_chunk_size=setup.chunk_size, min_pixels=side * side // 4, max_pixels=side * side,
        train=_train_settings(setup, strategy, count), lora=_lora(setup),
    )  # fmt: skip
    return MatchTask(config, dist_info)


def _summarise(tracker: MemTracker, tokens: int, seconds: float) -> Memory:
    categories: dict[str, float] = {}
    for device_snapshot in tracker.get_tracker_snapshot("peak").values():
        for key, value in device_snapshot.items():
            name = getattr(key, "value", str(key))
            categories[name] = categories.get(name, 0) + value
    get = categories.get
    params = sum(
        get(name, 0) for name in ("Parameter", "Buffer", "Sharded Param", "Unsharded Param", "All Gather")
    )
    grads = sum(get(name, 0) for name in ("Gradient", "Sharded Grad", "Unsharded Grad", "Reduce Scatter"))
    optimizer = get("Optstate", 0) + get("OptState", 0)
    activations = sum(get(name, 0) for name in ("Activation", "Temp", "Inputs", "Other"))
    peak = get("Total", 0)
    return Memory(
        params=params, grads=grads, optimizer=optimizer, activations=activations, peak=peak,
        phase=tracker.peak_phase, where=tracker.peak_where, seconds=seconds, tokens=tokens, categories=categories,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# The grid: full depth (or the --fit), the stage-2 chunk extrapolation, the table

FIELDS = ("params", "grads", "optimizer", "activations", "peak")


def combine(base: Memory, *terms: tuple[float, Memory, Memory]) -> Memory:
    """``base`` plus, per term ``(k, a, b)``, ``k`` times the difference ``b - a``, category by category."""
    values = {
        name: getattr(base, name) + sum(k * (getattr(b, name) - getattr(a, name)) for k, a, b in terms)
        for name in FIELDS
    }
    return Memory(**values, phase=base.phase, where=base.where, tokens=base.tokens)


@dataclass(frozen=True)
class Row:
    size: str
    stage: int
    full: bool
    strategy: str
    checkpointing: bool


def recipe_chunks(model: str, world_size: int) -> int:
    """GradCache chunks per side per rank in the recipe: 1024 pairs / ranks / chunk size."""
    return max(1, STAGE2_GLOBAL_BATCH // world_size // CHUNK_SIZE[model])


def run_row(
    row: Row, *, world_size: int, depth: tuple[int, int] | None, fit: bool, log: Any
) -> dict[str, Any]:
    """Measure one row of the table; ``depth`` None is the released depth."""
    model = SIZES[row.size]
    target = depth or FULL_DEPTH[model]
    points: dict[str, Memory] = {}

    def run(layers: int, vision_layers: int, chunks: int = 2) -> Memory:
        key = f"{layers}x{vision_layers}" + (f"/{chunks} chunks" if row.stage == 2 else "")
        if key not in points:
            setup = Setup(
                model=model, stage=row.stage, full=row.full, strategy=row.strategy,
                checkpointing=row.checkpointing, layers=layers, vision_layers=vision_layers,
                world_size=world_size, chunk_size=CHUNK_SIZE[model], chunks=chunks,
            )  # fmt: skip
            points[key] = measure(setup)
            log(f"  {key}: peak {points[key].peak / GIB:.2f} GiB ({points[key].seconds:.0f} s)")
        return points[key]

    if fit:
        (l0, v0), (l1, _), (_, v1) = FIT_DEPTHS
        base, more_layers, more_blocks = run(l0, v0), run(l1, v0), run(l0, v1)
        result = combine(
            base,
            ((target[0] - l0) / (l1 - l0), base, more_layers),
            ((target[1] - v0) / (v1 - v0), base, more_blocks),
        )
    else:
        result = run(*target)
    chunks = recipe_chunks(model, world_size)
    if row.stage == 2 and chunks > 2 and depth is None:
        # What one more chunk per side leaves held until the step ends, at any depth: its no-grad pass's caches.
        two, three = (run(2, 2, n).held for n in (2, 3))
        held = [Memory(params=0, grads=0, optimizer=0, activations=h, peak=h) for h in (two, three)]
        result = combine(result, (chunks - 2, *held))
    return {
        "row": asdict(row),
        "depth": list(target),
        "chunks_per_side": chunks if row.stage == 2 and depth is None else 2,
        "points": {key: asdict(value) for key, value in points.items()},
        "result": asdict(result),
    }


def format_table(results: list[dict[str, Any]]) -> str:
    header = ["recipe", "stage", "strategy", "act. ckpt", "params", "grads", "optimizer", "activations",
              "peak / GPU"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 4 + "---:|" * 5]
    for result in results:
        row, memory = result["row"], result["result"]
        cells = [
            f"{row['size'].upper()} {'full' if row['full'] else 'DoRA'}",
            "1 compress" if row["stage"] == 1 else "2 match",
            "FSDP x8" if row["strategy"] == "fsdp" else "DDP",
            "on" if row["checkpointing"] else "off",
            *(f"{memory[name] / GIB:.1f}" for name in FIELDS[:-1]),
            f"**{memory['peak'] / GIB:.1f}**",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3B, stage 1, DoRA, DDP and FSDP, checkpointing on, 2 LM layers x 2 ViT "
                        "blocks (nothing extrapolated)")  # fmt: skip
    parser.add_argument("--sizes", default="3b,7b")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--checkpointing", default="on,off")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument(
        "--fit", action="store_true", help="extrapolate the depth from 2 and 4 layers / blocks"
    )
    parser.add_argument("--json", default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    depth = None
    if args.quick:
        args.sizes, args.modes, args.checkpointing, args.stages, depth = "3b", "lora", "on", "1", (2, 2)
    rows = [
        Row(size, int(stage), mode == "full", strategy, checkpointing == "on")
        for size in args.sizes.split(",")
        for stage in args.stages.split(",")
        for mode in args.modes.split(",")
        for strategy in args.strategies.split(",")
        for checkpointing in args.checkpointing.split(",")
    ]
    started = time.perf_counter()
    results = []
    for row in rows:
        print(row, file=sys.stderr, flush=True)
        results.append(
            run_row(row, world_size=args.world_size, depth=depth, fit=args.fit,
                    log=lambda line: print(line, file=sys.stderr, flush=True))
        )  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    how = "extrapolated from 2 and 4 layers / blocks" if args.fit else "measured"
    depths = "; ".join(sorted({f"{r['row']['size'].upper()}: {r['depth'][0]} LM layers x {r['depth'][1]} ViT blocks"
                               for r in results}))  # fmt: skip
    print(f"GiB per GPU, {args.world_size} GPUs; depth {how} ({depths})\n")
    print(format_table(results))
    print(f"\n{len(rows)} configurations in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
