"""GPU throughput at Qwen2.5-VL-3B's shape (full depth, random weights, bf16): coma against the naive HF path.

Measured in one run, side by side (DESIGN §5 holds the anchors and the targets):

    encode-image   448 x 448 px image queries (256 visual tokens each) with an MMEB instruction -> items/s, MFU
    encode-text    short text targets -> items/s, MFU
    train-match    stage-2 training pairs/s and MFU with the paper recipe (DoRA r16 on q/k/v/o, GradCache chunks of
                   8, image queries vs text targets)

The naive path is what VLM2Vec-style code does: the processor runs in the main process between forwards, one plain
forward of the transformers model (SDPA, the vision tower looping over its windows) per batch (training: one
micro-batch of 8 pairs, forward + backward, no GradCache). coma's path is ``Embedder.encode`` and ``coma match``
(``run_stage``) exactly as a user runs them, with their default (``auto``) attention. A last line isolates the vision
tower's attention: ``Embedder.encode`` of the image queries with ``--vision-attn-implementation`` ``sdpa``
(transformers' per-window loop) against the default.

MFU counts matmul FLOPs only: 2 x the weights of every linear layer per token (LM and ViT) plus attention scores and
values (causal LM attention, windowed / full ViT attention), against ``--peak-tflops`` (989: dense bf16 on an
H100/H200 SXM). Training counts the LM's forward and the backward through its activations (2 x forward; the frozen
ViT only forward); GradCache's extra no-grad pass is overhead and not counted.

Without a CUDA device it prints why and exits 0. ``--cpu-smoke`` runs the whole script on a tiny model on the CPU (to
check it, not to measure).

    .venv/bin/python scripts/bench_gpu.py [--size qwen2.5-vl-3b] [--items 512] [--batch-size 64] [--train-steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coma.backbones.tiny import REAL_SHAPES, init_model
from coma.io import write_jsonl

IMAGE_SIDE = 448
QUERY = "<|image_1|>\nRepresent the given image for classification"
TARGETS = ["tench, Tinca tinca", "a red double-decker bus parked beside a brick building", "golden retriever",
           "two people riding bicycles along a river at sunset", "espresso maker"]  # fmt: skip


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = (rng.random((side // 8, side // 8, 3)) * 255).astype(np.uint8)
        path = folder / f"{index}.jpg"
        Image.fromarray(pixels).resize((side, side), Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Items per second of ``fn`` (which returns how many items it did), after one warm-up call."""
    fn()
    sync()
    start, done = time.perf_counter(), 0
    for _ in range(repeats):
        done += fn()
    sync()
    return done / (time.perf_counter() - start)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class FlopCounter:
    """Matmul FLOPs of one forward, from the model's config and the tokens it sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        text, vision = config.text_config, config.vision_config
        self.lm_layers, self.lm_hidden = text.num_hidden_layers, text.hidden_size
        self.lm_linear = sum(
            module.weight.numel()
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and ".language_model." in f".{name}"
            and "lm_head" not in name
        )
        vision_linear = {name: module.weight.numel() for name, module in model.named_modules()
                         if isinstance(module, torch.nn.Linear) and "visual" in name}  # fmt: skip
        # Mergers (and Qwen3-VL's DeepStack mergers) run on the 2 x 2-merged tokens, a quarter of the patches.
        self.vit_merger = sum(count for name, count in vision_linear.items() if "merger" in name)
        self.vit_linear = sum(vision_linear.values()) - self.vit_merger
        # Qwen2-VL names the ViT width embed_dim (its hidden_size is the LM width it projects to).
        self.vit_width = getattr(vision, "embed_dim", None) or vision.hidden_size
        self.vit_depth = vision.depth
        full = set(getattr(vision, "fullatt_block_indexes", None) or range(vision.depth))
        window = getattr(vision, "window_size", None)
        self.window_patches = (window // vision.patch_size) ** 2 if window else None
        self.full_blocks = len(full)

    def linear(self, lengths: list[int], patches: list[int]) -> float:
        """2 x weights per token of every linear layer the forward runs (no LM head: coma pools hidden states)."""
        return 2 * self.lm_linear * sum(lengths) + 2 * (self.vit_linear + self.vit_merger / 4) * sum(patches)

    def attention(self, lengths: list[int], patches: list[int]) -> float:
        """Scores and values: causal in the LM, per image (windowed in Qwen2.5-VL's window blocks) in the ViT."""
        lm = 2 * self.lm_layers * self.lm_hidden * sum(n * n for n in lengths)
        windowed = self.vit_depth - self.full_blocks
        vit = sum(
            4 * self.vit_width * n * (self.full_blocks * n + windowed * min(n, self.window_patches or n))
            for n in patches
        )
        return float(lm + vit)

    def forward(self, lengths: list[int], patches: list[int]) -> float:
        return self.linear(lengths, patches) + self.attention(lengths, patches)


def token_counts(batch: dict) -> tuple[list[int], list[int]]:
    """Each row's tokens and each image's patches in a processor batch."""
    grids = batch.get("image_grid_thw")
    patches = [] if grids is None else [int(t * h * w) for t, h, w in grids.tolist()]
    return batch["attention_mask"].sum(dim=1).tolist(), patches


def batch_flops(counter: FlopCounter, batch: dict) -> float:
    return counter.forward(*token_counts(batch))


def naive_encode(embedder, items: list[tuple[str, Path | None]], batch_size: int):
    """The plain HF path: the processor in this process, then one forward of the transformers model per batch."""
    model, processor, num_tokens = embedder.model.backbone, embedder.processor, embedder.config.num_tokens
    device = embedder.device

    def run() -> int:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            texts = [layout(embedder, text, path is not None) for text, path in chunk]
            images = [Image.open(path).convert("RGB") for _, path in chunk if path is not None] or None
            batch = processor(
                text=texts, images=images, return_tensors="pt", padding=True, padding_side="left"
            )
            batch = {key: value.to(device) for key, value in batch.items()}
            with torch.inference_mode():
                hidden = model.model(**batch, use_cache=False).last_hidden_state
            hidden[:, -num_tokens:].float().mean(dim=1).cpu()
        return len(items)

    return run


def layout(embedder, text: str, has_image: bool) -> str:
    """coma's input text (image block, instruction, compression tokens): both paths embed the same sequences."""
    from coma.compression import embedding_text

    return embedding_text(text, has_image, embedder.config, embedder.adapter.image_block)


def encode_cases(images: list[Path]) -> dict[str, list[tuple[str, Path | None]]]:
    return {
        "encode-image": [(QUERY, path) for path in images],
        "encode-text": [(TARGETS[i % len(TARGETS)], None) for i in range(len(images))],
    }


def coma_encode_rate(embedder, items: list[tuple[str, Path | None]], args) -> float:
    inputs = [{"text": text, "image": str(path)} if path else text for text, path in items]
    return timed(
        lambda: len(embedder.encode(inputs, batch_size=args.batch_size, show_progress=False)), args.repeats
    )


def encode_rows(args, embedder, naive_embedder, images: list[Path], counter) -> list[dict]:
    rows = []
    for name, items in encode_cases(images).items():
        sample = embedder.collate([embedder_input(text, path) for text, path in items[: args.batch_size]])
        flops_per_item = batch_flops(counter, sample) / len(sample["input_ids"])
        coma_rate = coma_encode_rate(embedder, items, args)
        naive_rate = timed(naive_encode(naive_embedder, items, args.batch_size), args.repeats)
        rows.append(row(name, "items/s", naive_rate, coma_rate, flops_per_item, args.peak_tflops))
    return rows


def embedder_input(text: str, path: Path | None):
    from coma.embedder import EncodeInput

    return EncodeInput(text, str(path) if path else None)


def row(name: str, unit: str, naive: float, coma: float, flops_per_item: float, peak_tflops: float) -> dict:
    def mfu(rate: float) -> float:
        return rate * flops_per_item / (peak_tflops * 1e12)

    return {"case": name, "unit": unit, "naive": naive, "coma": coma, "ratio": coma / naive,
            "naive_mfu": mfu(naive), "coma_mfu": mfu(coma)}  # fmt: skip


def naive_train_rate(model_dir: Path, images: list[Path], args, device, dtype) -> float:
    """Micro-batches of 8 pairs: processor in this process, DoRA forward + backward of both sides, AdamW step."""
    from peft import LoraConfig, get_peft_model

    from coma.embedder import Embedder

    embedder = Embedder.from_pretrained(model_dir, num_tokens=args.num_tokens, device=device, dtype=dtype,
                                        min_pixels=IMAGE_SIDE**2, max_pixels=IMAGE_SIDE**2)  # fmt: skip
    model = get_peft_model(embedder.model.backbone, LoraConfig(target_modules=embedder.adapter.lora_target_regex,
                                                               r=16, lora_alpha=64, lora_dropout=0.1, use_dora=True))  # fmt: skip
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5)
    micro, processor = 8, embedder.processor

    def embed(texts: list[str], image_paths: list[Path] | None) -> torch.Tensor:
        images = [Image.open(path).convert("RGB") for path in image_paths] if image_paths else None
        batch = processor(text=[layout(embedder, t, bool(image_paths)) for t in texts], images=images,
                          return_tensors="pt", padding=True, padding_side="left")  # fmt: skip
        batch = {key: value.to(device) for key, value in batch.items()}
        hidden = model.base_model.model.model(**batch, use_cache=False).last_hidden_state
        return torch.nn.functional.normalize(hidden[:, -args.num_tokens :].float().mean(dim=1), dim=-1)

    position = 0

    def step() -> int:
        nonlocal position
        paths = [images[(position + i) % len(images)] for i in range(micro)]
        position += micro
        queries = embed([QUERY] * micro, paths)
        targets = embed([TARGETS[i % len(TARGETS)] for i in range(micro)], None)
        loss = torch.nn.functional.cross_entropy(
            queries @ targets.T / 0.03, torch.arange(micro, device=device)
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return micro

    return timed(step, args.train_steps)


def coma_train_rate(model_dir: Path, root: Path, images: list[Path], args) -> float:
    """``coma match`` with the paper recipe (DoRA, GradCache chunks of 8) on image-query / text-target pairs."""
    import yaml

    from coma.recipes import from_dict
    from coma.train.match import MatchConfig
    from coma.train.run import run_stage

    data = root / "mmeb-train"
    write_jsonl(data / "Bench" / "train.jsonl", [
        {"qry": QUERY, "qry_image_path": str(path.relative_to(root)), "pos_text": TARGETS[i % len(TARGETS)],
         "pos_image_path": "", "neg_text": "", "neg_image_path": ""} for i, path in enumerate(images)])  # fmt: skip
    recipe = yaml.safe_load(
        (Path(__file__).resolve().parent.parent / "configs" / "match_qwen2_5_vl_3b.yaml").read_text()
    )
    recipe.update(model=str(model_dir), data=str(data), image_root=str(root), out=str(root / "run"), subsets=None,
                  caps=None, num_tokens=args.num_tokens, min_pixels=IMAGE_SIDE**2, max_pixels=IMAGE_SIDE**2,
                  block_size=args.train_batch, split=None)  # fmt: skip
    recipe["train"].update(global_batch_size=args.train_batch, max_steps=args.train_steps + 1,
                           save_every=10**6, show_progress=False)  # fmt: skip
    if not torch.cuda.is_available():
        recipe["train"].update(dtype="float32", gradient_checkpointing=False)
    run_stage("match", from_dict(MatchConfig, recipe))
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(record["samples_per_s"] for record in records[1:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen2.5-vl-3b", choices=sorted(REAL_SHAPES))
    parser.add_argument("--items", type=int, default=256, help="inputs per encode case")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the inputs after a warm-up")
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--train-batch", type=int, default=64, help="coma match global batch (chunks of 8)")
    parser.add_argument("--num-tokens", type=int, default=32)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script only"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("bench_gpu: no CUDA device; skipping (use --cpu-smoke to check the script on the CPU)")
        return 0
    from coma.embedder import Embedder
    from coma.eval.runner import attn_implementations

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    side = IMAGE_SIDE if not args.cpu_smoke else 112
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        started = time.perf_counter()
        if args.cpu_smoke:
            model_dir = init_model(root / "model", size="small", family="qwen2_5_vl", seed=0)
        else:
            shape = REAL_SHAPES[args.size].hub_config
            model_dir = init_model(root / "model", size=args.size, seed=0,
                                   layers=shape.get("text_config", shape)["num_hidden_layers"],
                                   vision_layers=shape["vision_config"]["depth"])  # fmt: skip
        print(f"model built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        images = write_images(root / "images", args.items, side)
        load = partial(Embedder.from_pretrained, model_dir, num_tokens=args.num_tokens, device=device, dtype=dtype,
                       min_pixels=side * side, max_pixels=side * side)  # fmt: skip
        embedder, naive_embedder = load(), load(attn_implementation="sdpa", vision_attn_implementation="sdpa")
        counter = FlopCounter(embedder.model.backbone)
        rows = encode_rows(args, embedder, naive_embedder, images, counter)
        vision = attn_implementations(embedder)["vision_attn_implementation"]
        # The default's rate is encode-image's coma column; the same inputs once more on transformers' loop.
        vision_loop_rate = coma_encode_rate(naive_embedder, encode_cases(images)["encode-image"], args)
        del naive_embedder
        pair_flops = 2 * (batch_flops(counter, embedder.collate([embedder_input(QUERY, images[0])]))
                          + batch_flops(counter, embedder.collate([embedder_input(TARGETS[0], None)])))  # fmt: skip
        del embedder
        naive = naive_train_rate(model_dir, images, args, device, dtype)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the naive model is gone; its cached blocks would crowd coma's run
        coma = coma_train_rate(model_dir, root, images, args)
        rows.append(row("train-match", "pairs/s", naive, coma, pair_flops, args.peak_tflops))
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke run, not a measurement)"
    print(
        f"\n{args.size if not args.cpu_smoke else 'small qwen2_5_vl'}, {name}, {dtype}, batch {args.batch_size}\n"
    )
    print("| case | naive HF | coma | coma / naive | naive MFU | coma MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} ({r['unit']}) | {r['naive']:.1f} | {r['coma']:.1f} | {r['ratio']:.2f} | "
              f"{r['naive_mfu']:.1%} | {r['coma_mfu']:.1%} |")  # fmt: skip
    default = rows[0]["coma"]
    print(f"\nencode-image, coma, vision attention: transformers' SDPA loop {vision_loop_rate:.1f} items/s, "
          f"default ({vision}) {default:.1f} items/s, ratio {default / vision_loop_rate:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
