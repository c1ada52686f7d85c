"""Benchmark encoding and training throughput on tiny/small random models and the small synthetic world (CPU).

Offline and self-contained: builds random ``qwen2_vl`` models (BPE tokenizer) and ``generate_world(size="small")``
(112-px images -> 16 visual tokens) in a temp folder, then runs each configuration in a fresh subprocess
(``--one NAME``) so that its peak RSS (``ru_maxrss``) belongs to that configuration alone. Every configuration is
fp32 on the CPU, T=8 compression tokens, batch 64, and is timed after a warm-up of two steps:

    encode-SIZE         Embedder.encode, batch 64, image+text inputs, collation included -> items/s
    raw-SIZE            forward + backward + AdamW over the EmbeddingModel, language model fully fine-tuned
                        (vision frozen), in-batch InfoNCE, image queries vs text targets; batches are collated
                        before timing, so this is model work only -> samples/s
    stage1-SIZE-wN      run_stage("compress") on stage1/conversations.jsonl, LoRA/DoRA defaults, global batch
                        64, micro batch 8 -> samples/s
    stage2-MODE-SIZE-wN run_stage("match") on train/, LoRA/DoRA defaults, MODE gc (GradCache, chunks 8/8) or
                        plain (one forward per side), global batch 64; for tiny also MODE-b256 (batch 256,
                        not with --quick), where GradCache's lower peak RSS shows -> pairs/s

Each stage configuration runs once per ``--workers`` value (``-w0``: batches prepared in the training process;
``-wauto``: the default worker count), side by side. With ``--baseline DIR`` (a checkout of earlier code, e.g.
``git worktree add /tmp/coma-before <commit>``) each stage configuration also runs once on that code
(``-before``, its ``src`` first on PYTHONPATH, with that code's own data path).

The stage rates come from the ``metrics.jsonl`` the training loop writes: total work over total time of the
steps after the first two; "data wait" is the share of that time the step spent waiting for its prepared batch
(``data_wait_s``; with 0 workers that is the whole collation, image decode and processor included), "compute" the
rest (forward, backward, optimizer). "seconds" is the wall time of the whole subprocess (imports, loading, warm-up,
measured steps, final save). One sample is one query-target pair.

Measure on an idle machine: with one torch thread per core, any other busy process makes OpenMP's waits
collide and steps run many times slower (the header prints the load average and warns).

    .venv/bin/python scripts/bench_train.py [--quick] [--sizes tiny,small] [--steps N] [--threads N]
                                            [--workers 0,auto] [--baseline DIR] [--only PREFIX,...]
                                            [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from coma.backbones.tiny import init_model  # noqa: E402
from coma.data.formats import read_mmeb_train_subset  # noqa: E402
from coma.data.synth import generate_world  # noqa: E402
from coma.embedder import Embedder, EncodeInput  # noqa: E402
from coma.io import write_json  # noqa: E402
from coma.losses import info_nce  # noqa: E402
from coma.train.compress import CompressConfig  # noqa: E402
from coma.train.config import LoraSettings, TrainSettings  # noqa: E402
from coma.train.loop import DistInfo, seed_everything  # noqa: E402
from coma.train.match import MatchConfig  # noqa: E402
from coma.train.run import run_stage  # noqa: E402
from coma.train.setup import load_trainable_embedder  # noqa: E402
from coma.train.stage2_data import pair_inputs  # noqa: E402

# The baseline's configs may predate the field; the driver never asks it for workers.
HAS_WORKERS = "num_workers" in {f.name for f in dataclasses.fields(TrainSettings)}

NUM_TOKENS = 8
BATCH = 64
LARGE_BATCH = 256  # tiny only: where GradCache's lower peak memory shows on a CPU
WARMUP_STEPS = 2
STAGE1_MICRO_BATCH = 8  # TrainSettings' default
GRAD_CACHE_CHUNK = 8
DEFAULT_STEPS = 4
QUICK_STEPS = 1
SIZES = ("tiny", "small")
SUBPROCESS_TIMEOUT_S = 900
# Image queries with text targets, for the raw contrastive step.
RAW_SUBSETS = ("SynthI2T", "SynthCls")
SEED = 0


@dataclass
class Result:
    config: str
    rate: float
    unit: str
    tokens_per_s: float | None
    measured_steps: int
    measured_s: float
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    note: str = ""
    data_wait_share: float | None = None  # of the measured step time


# ---------------------------------------------------------------------------------------------------------------
# One configuration (runs in its own process)


def world_paths(workdir: Path) -> tuple[Path, Path]:
    """(world folder, its image root)."""
    return workdir / "world", workdir / "world" / "images"


def model_dir(workdir: Path, size: str) -> Path:
    return workdir / "models" / size


def train_settings(
    global_batch: int, steps: int, micro_batch: int = 8, workers: int | None = None
) -> TrainSettings:
    settings = TrainSettings(
        global_batch_size=global_batch,
        micro_batch_size=micro_batch,
        max_steps=WARMUP_STEPS + steps,
        dtype="float32",
        device="cpu",
        show_progress=False,
        save_every=10**9,  # the loop still writes the final checkpoint
        keep_checkpoints=1,
        seed=SEED,
    )
    if HAS_WORKERS:
        settings.num_workers = workers
    return settings


def image_text_pairs(workdir: Path, count: int) -> list[tuple[EncodeInput, EncodeInput]]:
    """``count`` (image query, text target) pairs, cycling through the image-to-text subsets."""
    world, _ = world_paths(workdir)
    pairs = []
    for subset in RAW_SUBSETS:
        for pair in read_mmeb_train_subset(world / "train" / subset):
            query, target, _ = pair_inputs(pair)
            pairs.append((query, target))
    return [pairs[index % len(pairs)] for index in range(count)]


def bench_encode(workdir: Path, steps: int, size: str) -> Result:
    _, image_root = world_paths(workdir)
    embedder = Embedder.from_pretrained(
        model_dir(workdir, size), num_tokens=NUM_TOKENS, device="cpu", dtype=torch.float32
    )
    items = [query for query, _ in image_text_pairs(workdir, BATCH * (WARMUP_STEPS + steps))]
    warmup, measured = items[: BATCH * WARMUP_STEPS], items[BATCH * WARMUP_STEPS :]
    embedder.encode(warmup, batch_size=BATCH, show_progress=False, image_root=image_root)
    start = time.perf_counter()
    embedder.encode(measured, batch_size=BATCH, show_progress=False, image_root=image_root)
    seconds = time.perf_counter() - start
    # Counted outside the timed call; the non-padding token count does not depend on how inputs are grouped.
    tokens = sum(
        int(embedder.collate(measured[i : i + BATCH], image_root)["attention_mask"].sum())
        for i in range(0, len(measured), BATCH)
    )
    return Result(f"encode-{size}", len(measured) / seconds, "items/s", tokens / seconds, steps, seconds)


def bench_raw(workdir: Path, steps: int, size: str) -> Result:
    _, image_root = world_paths(workdir)
    config = MatchConfig(
        model=str(model_dir(workdir, size)),
        num_tokens=NUM_TOKENS,
        train=train_settings(BATCH, steps),
        lora=LoraSettings(full_finetune=True),
    )
    embedder = load_trainable_embedder(config, DistInfo())
    model = embedder.model
    pairs = image_text_pairs(workdir, BATCH * (WARMUP_STEPS + steps))
    collate_start = time.perf_counter()
    batches = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        batches.append(
            (
                embedder.collate([query for query, _ in chunk], image_root),
                embedder.collate([target for _, target in chunk], image_root),
            )
        )
    collate_rate = 2 * len(pairs) / (time.perf_counter() - collate_start)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    model.train()
    measured_s, tokens = 0.0, 0
    for index, (queries, targets) in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = info_nce(model(queries), model(targets), temperature=0.03)
        loss.backward()
        optimizer.step()
        if index >= WARMUP_STEPS:
            measured_s += time.perf_counter() - start
            tokens += int(queries["attention_mask"].sum()) + int(targets["attention_mask"].sum())
    trainable = sum(parameter.numel() for parameter in parameters)
    return Result(
        f"raw-{size}",
        BATCH * steps / measured_s,
        "samples/s",
        tokens / measured_s,
        steps,
        measured_s,
        note=f"{trainable / 1e6:.2f}M trainable; collate {collate_rate:.0f} items/s (not timed)",
    )


def loop_throughput(out: Path, batch: int) -> tuple[float, float, int, float, float | None]:
    """(samples/s, tokens/s, steps, seconds, data-wait share or None) over the steps after the warm-up in
    ``out/metrics.jsonl``.

    Each step's time is batch / samples_per_s, so the rates are total work over total time.
    """
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()][WARMUP_STEPS:]
    if not records:
        raise RuntimeError(f"{out / 'metrics.jsonl'}: no steps after the {WARMUP_STEPS} warm-up steps")
    times = [batch / record["samples_per_s"] for record in records]
    tokens = sum(record["tokens_per_s"] * seconds for record, seconds in zip(records, times, strict=True))
    total = sum(times)
    waits = [record.get("data_wait_s") for record in records]
    share = None if None in waits else sum(waits) / total
    return batch * len(records) / total, tokens / total, len(records), total, share


def bench_stage1(workdir: Path, steps: int, size: str, workers: int | None, name: str) -> Result:
    world, image_root = world_paths(workdir)
    out = workdir / "runs" / name
    config = CompressConfig(
        model=str(model_dir(workdir, size)),
        data=[str(world / "stage1" / "conversations.jsonl")],
        image_root=str(image_root),
        out=str(out),
        num_tokens=NUM_TOKENS,
        train=train_settings(BATCH, steps, micro_batch=STAGE1_MICRO_BATCH, workers=workers),
        lora=LoraSettings(),
    )
    run_stage("compress", config)
    rate, tokens, measured, seconds, share = loop_throughput(out, BATCH)
    return Result(name, rate, "samples/s", tokens, measured, seconds, note="LoRA/DoRA, micro 8",
                  data_wait_share=share)  # fmt: skip


def bench_stage2(
    workdir: Path, steps: int, size: str, grad_cache: bool, batch: int, workers: int | None, name: str
) -> Result:
    world, image_root = world_paths(workdir)
    out = workdir / "runs" / name
    chunk = GRAD_CACHE_CHUNK if grad_cache else None
    config = MatchConfig(
        model=str(model_dir(workdir, size)),
        data=str(world / "train"),
        image_root=str(image_root),
        out=str(out),
        grad_cache=grad_cache,
        query_chunk_size=chunk,
        target_chunk_size=chunk,
        num_tokens=NUM_TOKENS,
        train=train_settings(batch, steps, workers=workers),
        lora=LoraSettings(),
    )
    run_stage("match", config)
    rate, tokens, measured, seconds, share = loop_throughput(out, batch)
    note = f"LoRA/DoRA, {'GradCache chunks 8/8' if grad_cache else 'plain'}, batch {batch}"
    return Result(name, rate, "pairs/s", tokens, measured, seconds, note=note, data_wait_share=share)


def stage2_name(size: str, grad_cache: bool, batch: int) -> str:
    suffix = "" if batch == BATCH else f"-b{batch}"
    return f"stage2-{'gc' if grad_cache else 'plain'}{suffix}-{size}"


BEFORE = "before"  # the --baseline code, with its own data path


def variants(workers: list[str], baseline: bool) -> list[str]:
    """Suffixes of one stage configuration: the baseline code first, then each worker setting."""
    return ([BEFORE] if baseline else []) + [f"w{count}" for count in workers]


def worker_count(variant: str) -> int | None:
    return None if variant in (BEFORE, "wauto") else int(variant.removeprefix("w"))


def configurations(
    sizes: list[str], quick: bool, workers: list[str], baseline: bool
) -> dict[str, Callable[[Path, int], Result]]:
    """Configuration name -> benchmark(workdir, steps), in run order; stage runs side by side per variant."""
    plan: dict[str, Callable[[Path, int], Result]] = {}
    for size in sizes:
        plan[f"encode-{size}"] = partial(bench_encode, size=size)
        plan[f"raw-{size}"] = partial(bench_raw, size=size)
        for variant in variants(workers, baseline):
            name = f"stage1-{size}-{variant}"
            plan[name] = partial(bench_stage1, size=size, workers=worker_count(variant), name=name)
        batches = [BATCH] if quick or size != "tiny" else [BATCH, LARGE_BATCH]
        for batch in batches:
            for grad_cache in (True, False):
                for variant in variants(workers, baseline):
                    name = f"{stage2_name(size, grad_cache, batch)}-{variant}"
                    plan[name] = partial(bench_stage2, size=size, grad_cache=grad_cache, batch=batch,
                                         workers=worker_count(variant), name=name)  # fmt: skip
    return plan


def run_one(name: str, workdir: Path, steps: int, result_file: Path) -> None:
    # The plan for this one name's worker setting (its suffix), so that the name is in it.
    suffix = name.rsplit("-", 1)[-1]
    workers = [suffix.removeprefix("w")] if suffix.startswith("w") else ["0"]
    all_configs = configurations(list(SIZES), quick=False, workers=workers, baseline=True)
    if name not in all_configs:
        raise SystemExit(f"unknown configuration {name!r}; choose one of {', '.join(all_configs)}")
    seed_everything(SEED)
    result = all_configs[name](workdir, steps)
    # ru_maxrss is in KiB on Linux.
    result.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_json(result_file, asdict(result))


# ---------------------------------------------------------------------------------------------------------------
# The driver


def prepare(workdir: Path, sizes: list[str]) -> None:
    generate_world(workdir / "world", seed=SEED, size="small", image_size=112)
    for size in sizes:
        init_model(model_dir(workdir, size), family="qwen2_vl", size=size, tokenizer="bpe", seed=SEED)


def run_in_subprocess(
    name: str, workdir: Path, steps: int, threads: int | None, baseline: Path | None
) -> Result:
    result_file = workdir / "results" / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--workdir", str(workdir),
               "--steps", str(steps), "--result", str(result_file)]  # fmt: skip
    if threads is not None:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    if name.endswith(f"-{BEFORE}"):
        # Ahead of the editable install's path entry: this configuration imports the baseline's coma.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline / "src"), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, env=env)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {process.returncode}):\n{process.stderr[-4000:]}")
    result = Result(**json.loads(result_file.read_text(encoding="utf-8")))
    result.seconds = seconds
    return result


def format_table(results: list[Result]) -> str:
    header = ("config", "rate", "unit", "tokens/s", "step ms", "data wait ms", "compute ms", "wait %",
              "peak RSS MB", "seconds", "steps", "note")  # fmt: skip
    rows = []
    for r in results:
        step_ms = 1000 * r.measured_s / r.measured_steps
        wait = None if r.data_wait_share is None else r.data_wait_share * step_ms
        rows.append((r.config, f"{r.rate:.1f}", r.unit, "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                     f"{step_ms:.0f}", "-" if wait is None else f"{wait:.0f}",
                     "-" if wait is None else f"{step_ms - wait:.0f}",
                     "-" if wait is None else f"{100 * r.data_wait_share:.1f}",
                     f"{r.peak_rss_mb:.0f}", f"{r.seconds:.1f}", str(r.measured_steps), r.note))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = set(range(1, 11)) - {2}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), line(tuple("-" * width for width in widths)), *(line(r) for r in rows)])


def ratio_lines(results: list[Result]) -> list[str]:
    """Each stage configuration's variants against its first one (the baseline code, else 0 workers)."""
    groups: dict[str, list[Result]] = {}
    for result in results:
        base, _, variant = result.config.rpartition("-")
        if variant == BEFORE or variant.startswith("w"):
            groups.setdefault(base, []).append(result)
    lines = []
    for base, group in groups.items():
        first = group[0]
        lines += [f"{base}: {r.config.rpartition('-')[2]} / {first.config.rpartition('-')[2]} = "
                  f"{r.rate / first.rate:.2f}x" for r in group[1:]]  # fmt: skip
    return lines


def environment() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} measured step(s), no batch 256")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated model sizes (tiny,small)")
    parser.add_argument("--steps", type=int, default=None, help=f"measured steps (default {DEFAULT_STEPS})")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, one a core)"
    )
    parser.add_argument(
        "--workers",
        default="0,auto",
        help="DataLoader worker settings of the stage runs: 0,auto (auto: default)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a checkout of earlier code: stage runs on it too (-before)",
    )
    parser.add_argument("--only", default=None, help="run only configurations starting with one of: a,b")
    # Internal: run one configuration against an existing work folder (the driver's subprocesses).
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [size.strip() for size in args.sizes.split(",") if size.strip()]
    unknown = sorted(set(args.sizes) - set(SIZES))
    if unknown or not args.sizes:
        parser.error(f"--sizes: unknown or empty {unknown}; choose from {', '.join(SIZES)}")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.one is not None and (args.workdir is None or args.result is None):
        parser.error("--one needs --workdir and --result")
    args.workers = [value.strip() for value in args.workers.split(",") if value.strip()]
    if not args.workers or not all(value == "auto" or value.isdigit() for value in args.workers):
        parser.error("--workers: comma-separated counts or auto")
    if args.baseline is not None and not (args.baseline / "src" / "coma").is_dir():
        parser.error(f"--baseline: {args.baseline} holds no src/coma")
    args.only = [value.strip() for value in args.only.split(",")] if args.only else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.one is not None:
        run_one(args.one, args.workdir, args.steps, args.result)
        return 0
    env = environment()
    print(f"coma bench_train: torch {env['torch']}, {env['torch_threads']} torch threads, "
          f"{env['cpu_count']} CPUs ({env['cpus_usable']} usable), load average {env['load_average']}")  # fmt: skip
    print(f"fp32 CPU, T={NUM_TOKENS}, batch {BATCH}, {WARMUP_STEPS} warm-up + {args.steps} measured step(s), "
          f"sizes {', '.join(args.sizes)}")  # fmt: skip
    load = env["load_average"]
    if load is not None and load[0] > 0.5:
        # With every core given a torch thread, a second busy process makes OpenMP's spin-waits collide and
        # steps get up to ~30x slower: such figures say nothing about the code.
        print(f"WARNING: the machine is not idle (1-min load {load[0]:.2f}); timings will be unreliable")
    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="coma-bench-train-") as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.sizes)
        print(f"prepared models and world in {time.perf_counter() - started:.1f} s")
        plan = configurations(args.sizes, args.quick, args.workers, args.baseline is not None)
        for name in plan:
            if args.only and not name.startswith(tuple(args.only)):
                continue
            result = run_in_subprocess(name, workdir, args.steps, args.threads, args.baseline)
            print(f"  {name}: {result.rate:.1f} {result.unit}, peak RSS {result.peak_rss_mb:.0f} MB, "
                  f"{result.seconds:.1f} s", flush=True)  # fmt: skip
            results.append(result)
    total = time.perf_counter() - started
    print()
    print(format_table(results))
    print("\n".join(["", *ratio_lines(results)]))
    print(f"\ntotal {total:.1f} s")
    if args.json is not None:
        write_json(args.json, {"environment": env, "steps": args.steps, "warmup_steps": WARMUP_STEPS,
                               "total_seconds": total, "results": [asdict(r) for r in results]})  # fmt: skip
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
