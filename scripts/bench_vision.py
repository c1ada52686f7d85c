"""The vision tower alone: transformers' SDPA loop over windows and images against coma's ``packed_sdpa``.

Builds a random model at a real shape (default Qwen2.5-VL-3B's ViT: 1280 wide, 16 heads, 112-px windows, every 8th
block full) with ``--vision-layers`` blocks, encodes ``--batch`` random images of ``--side`` px (every image
``--side`` x ``--side``, or mixed sizes with ``--mixed``) and times the tower's forward for each implementation in the
same run, alternating, after one warm-up each. Runs on CUDA (bf16) when there is one, else on the CPU (fp32).

    .venv/bin/python scripts/bench_vision.py [--size qwen2.5-vl-3b] [--vision-layers 8] [--side 448] [--batch 8]
                                             [--repeats 3] [--mixed]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from coma.backbones import load_backbone  # noqa: E402
from coma.backbones.attention import PACKED_SDPA, transformers_attn_implementation  # noqa: E402
from coma.backbones.tiny import REAL_SHAPES, init_model  # noqa: E402

IMPLEMENTATIONS = ("sdpa", PACKED_SDPA)


def images(count: int, side: int, mixed: bool) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(side, side)] * count
    if mixed:  # sizes that leave partial windows, as real photos do
        sizes = [(side - 28 * (index % 4), side - 14 * (index % 3)) for index in range(count)]
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="qwen2.5-vl-3b", choices=sorted(REAL_SHAPES))
    parser.add_argument("--vision-layers", type=int, default=8)
    parser.add_argument("--side", type=int, default=448)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mixed", action="store_true", help="images of several sizes (partial windows)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as temp:
        model_dir = init_model(Path(temp), size=args.size, layers=1, vision_layers=args.vision_layers)
        towers, processor, adapter = {}, None, None
        for name in IMPLEMENTATIONS:
            model, processor, adapter = load_backbone(
                model_dir, dtype=dtype, attn_implementation=transformers_attn_implementation("sdpa", name)
            )
            towers[name] = adapter.vision_tower(model).to(device).eval()
    batch = processor.image_processor(images=images(args.batch, args.side, args.mixed), return_tensors="pt")
    pixels, grid = batch["pixel_values"].to(device, dtype), batch["image_grid_thw"].to(device)
    seconds: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    outputs = {}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name, tower in towers.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outputs[name] = tower(pixels, grid_thw=grid).pooler_output
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:  # the first pass is the warm-up
                    seconds[name].append(time.perf_counter() - start)
    difference = (outputs["sdpa"].float() - outputs[PACKED_SDPA].float()).abs().max().item()
    patches = int(grid.prod(dim=1).sum())
    print(f"{args.size} ViT, {args.vision_layers} blocks, {args.batch} images of {args.side} px"
          f"{' (mixed sizes)' if args.mixed else ''}, {patches} patches, {device.type} {dtype}, "
          f"{torch.get_num_threads()} threads; max |difference| {difference:.2e}\n", file=sys.stderr)  # fmt: skip
    print("| vision attention | images/s | ms per batch |")
    print("|---|---:|---:|")
    rates = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        rates[name] = args.batch / median
        print(f"| {name} | {rates[name]:.1f} | {1000 * median:.0f} |")
    print(f"\npacked_sdpa / sdpa: {rates[PACKED_SDPA] / rates['sdpa']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
