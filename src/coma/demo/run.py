"""The embedded default: CoMa vs. matching-only on the synthetic world, on a laptop CPU, with no downloads.

From one stage-0 model (a random tiny VLM instruction-tuned on the world's captions and QA) it trains
(a) matching only, (b) compression then matching (CoMa) and (c) matching only with extra steps worth stage 1's
compute, evaluates all three with the MMEB harness and writes an MMEB-style table, beside the diagnostics of every
model (:mod:`coma.demo.diagnostics`; stage 1 is also trained with the other attention mask for them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from coma.io import atomic_write_text, write_json
from coma.train.config import LoraSettings

ARMS = ("match_only", "coma", "match_only_compute")
ARM_LABELS = {
    "match_only": "(a) matching only",
    "coma": "(b) compression → matching (CoMa)",
    "match_only_compute": "(c) matching only, + stage-1 compute",
}
META_TASKS = ("classification", "vqa", "retrieval", "grounding")
COLUMNS = (*META_TASKS, "IND", "OOD", "overall")
# A random tiny model has no pretrained vision to protect: every demo stage trains the whole model (the paper's
# LoRA-on-the-LM with a frozen ViT is what the configs/ recipes run on real checkpoints).
TINY_MODEL_TRAINING = LoraSettings(full_finetune=True, train_vision=True)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    seeds: int = 1
    world_seed: int = 0
    world_size: str = "default"
    family: str = "qwen2_vl"
    model_size: str = "tiny"
    num_tokens: int = 8
    # Stage 0 until the model reads its images: colour and word answers start to follow the image only after
    # about 600 steps at batch 32 (500 steps: none; 1000: half the colour questions right).
    stage0_epochs: float = 16.0
    stage0_lr: float = 2e-3
    stage0_batch_size: int = 32
    # Stage 1 as in the paper: one epoch at the matching learning rate (and, here, the matching batch size).
    stage1_epochs: float = 1.0
    stage1_lr: float = 1e-3
    stage1_batch_size: int = 16
    # "none" is the ablation: stage 1's answers also see the image directly, not only through the tokens.
    stage1_mask_mode: str = "bottleneck"
    # The paper's stage-1 ablation axes: what is supervised, and what data stage 1 sees (see stage1_variant).
    stage1_supervise: str = "answers"
    stage1_turns: str = "multi"
    stage1_data: str = "qa"
    # Small batches, many steps: at equal compute, 16 x 520 steps beat 64 x 130 (16.6 vs 9.0 overall P@1).
    stage2_steps: int = 400
    stage2_lr: float = 1e-3
    batch_size: int = 16
    temperature: float = 0.05
    symmetric: bool = True
    eval_batch_size: int = 64
    eval_queries: int | None = None
    # Held-out images behind the diagnostics (QA accuracy, linear probes, collapse).
    diagnostic_images: int = 300
    # Arms run side by side in this many processes (one thread each): a tiny model keeps one core only
    # partly busy, so two single-thread processes do ~1.6x the work of one two-thread process.
    workers: int = 2
    show_progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def worker_progress(self) -> bool:
        """Progress bars for phases that may run in the workers: off with several, whose bars would interleave."""
        return self.show_progress and self.workers == 1


def quick_config(config: DemoConfig) -> DemoConfig:
    """The CI smoke-test setting: a small world and a few steps of everything."""
    return replace(config, world_size="small", stage0_epochs=4.0, stage2_steps=30, diagnostic_images=60)


class Phases:
    """Wall time per phase, printed as it goes; ``submit`` runs a phase in the worker pool (if there is one)."""

    def __init__(self, pool: Executor | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.pool = pool

    def run(self, name: str, function, *args, **kwargs):
        print(f"== {name}", flush=True)
        result, seconds = _timed(function, *args, **kwargs)
        return self._done(name, result, seconds)

    def submit(self, name: str, function, *args, threads: int = 1, **kwargs) -> Future:
        """Start a phase; its Future gives the phase's result once it has finished and been logged.

        In the pool the phase runs on ``threads`` torch threads (the workers' default is one): a phase that runs
        alone can use every core.
        """
        if self.pool is None:
            done: Future = Future()
            try:
                done.set_result(self.run(name, function, *args, **kwargs))
            except Exception as error:  # noqa: BLE001 - handed to the caller through the Future, as a pool would
                done.set_exception(error)
            return done
        print(f"== {name} (started)", flush=True)
        logged: Future = Future()
        inner = self.pool.submit(_timed, _on_torch_threads, threads, function, *args, **kwargs)
        inner.add_done_callback(lambda f: _relay(f, logged, lambda r: self._done(name, *r)))
        return logged

    def _done(self, name: str, result: Any, seconds: float) -> Any:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 2)
        print(f"   {name}: {seconds:.1f} s", flush=True)
        return result


def _timed(function, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    return function(*args, **kwargs), time.perf_counter() - start


def _on_torch_threads(threads: int, function, *args, **kwargs) -> Any:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)


def _relay(source: Future, target: Future, on_result) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(on_result(source.result()))


def _single_thread_worker() -> None:
    import torch

    torch.set_num_threads(1)
    # Import the heavy modules now: workers start with the pool, while this process draws the world.
    import coma.eval.runner  # noqa: F401
    import coma.train.run  # noqa: F401


@contextlib.contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """``workers`` spawned single-thread processes, or None (phases run in this process) for one worker."""
    if workers <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread_worker) as pool:
        pool.submit(time.sleep, 0)  # starts the workers (they spawn on the first task)
        yield pool


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def ensure_world(config: DemoConfig, out: Path) -> Path:
    from coma.data.synth import generate_world
    from coma.data.synth.writer import GENERATOR_VERSION

    world = out / f"world-s{config.world_seed}-{config.world_size}-g{GENERATOR_VERSION}"
    if not (world / "world.json").is_file():
        generate_world(world, seed=config.world_seed, size=config.world_size)
    return world


def ensure_base_model(config: DemoConfig, out: Path, seed: int) -> Path:
    from coma.backbones import tiny

    # Keyed by what the random model is built from (widths, tokenizer corpus), not only by its name.
    build = _key(repr(tiny.SIZES[config.model_size]), tiny.tokenizer_corpus())
    path = out / "cache" / f"base-{config.family}-{config.model_size}-s{seed}-{build}"
    if not (path / "config.json").is_file():
        tiny.init_model(path, family=config.family, size=config.model_size, seed=seed)
    return path


def _train_settings(config: DemoConfig, seed: int, lr: float, batch_size: int, **overrides: Any):
    from coma.train.config import TrainSettings

    settings = {"learning_rate": lr, "global_batch_size": batch_size, "micro_batch_size": batch_size,
                "warmup_ratio": 0.05, "seed": seed, "save_every": 10**9, "keep_checkpoints": 1,
                "dtype": "float32", "show_progress": config.worker_progress,
                **overrides}  # fmt: skip
    return TrainSettings(**settings)


def stage0(config: DemoConfig, world: Path, base: Path, out: Path, seed: int) -> Path:
    """Instruction-tune the random model on captions and simple QA (full model, vision included); cached."""
    from coma.train.compress import CompressConfig
    from coma.train.run import run_stage

    # Stage 0 runs alone, so its progress bar stays readable even in a worker.
    settings = _train_settings(config, seed, config.stage0_lr, config.stage0_batch_size,
                               num_epochs=config.stage0_epochs, show_progress=config.show_progress)  # fmt: skip
    stage_config = CompressConfig(
        model=str(base), data=[str(world / "stage0" / "conversations.jsonl")], image_root=str(world / "images"),
        num_tokens=config.num_tokens, layout="chat", max_length=512, train=settings,
        lora=TINY_MODEL_TRAINING,
    )  # fmt: skip
    # Keyed by what shapes the weights: not by where the output folder is (``--out runs/x`` and its absolute path
    # share a cache), nor by whether a progress bar was shown.
    recipe = asdict(stage_config)
    recipe.update(
        model=base.name, data=None, image_root=None, train={**recipe["train"], "show_progress": None}
    )
    path = out / "cache" / f"stage0-s{seed}-{_key(recipe, world.name)}"
    if not (path / "coma_config.json").is_file():
        stage_config.out = str(path)
        run_stage("compress", stage_config)
    return path


def teacher_data(world: Path, out: Path) -> Path:
    """Stage-1 data as the paper makes it: ``coma generate`` asks a teacher over HTTP (here the scripted teacher on
    loopback, answering from the world's scene graphs) for questions and multi-turn answers about each image.

    One image at a time, so the records keep the world's order and a run is reproducible; cached per world (the
    generator's own resume skips what is there).
    """
    from coma.data.formats import read_conversations
    from coma.data.generate import GenerateConfig, generate
    from coma.data.teacher_server import ScriptedTeacher

    source = world / "stage1" / "conversations.jsonl"
    script = {conv.image: list(conv.turns) for conv in read_conversations(source)}
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    path = out / "cache" / f"stage1-teacher-{_key(digest, world.name)}.jsonl"
    with ScriptedTeacher(script, world / "images", model="scripted-teacher") as url:
        config = GenerateConfig(teacher_url=url, teacher_model="scripted-teacher", out=str(path), concurrency=1,
                                max_retries=2, show_progress=False)  # fmt: skip
        summary = generate(config, list(script), world / "images")
    if summary["rejected_this_run"]:
        raise RuntimeError(
            f"the scripted teacher's data was rejected for {summary['rejected_this_run']} image(s)"
        )
    return path


STAGE1_TURNS = ("multi", "single")
STAGE1_DATA = ("qa", "caption")


def stage1_variant(config: DemoConfig, world: Path, teacher: Path, out: Path) -> Path:
    """Stage 1's data for the ablation axes: the teacher's multi-turn QA as it is (the default), each of its
    turns as a record of its own (``single``: the same answers, one per image pass), or one caption per image
    (``caption``: "Describe the image." and the scene's full caption). Cached per world."""
    if config.stage1_turns not in STAGE1_TURNS:
        raise ValueError(f"stage1_turns must be one of {STAGE1_TURNS}, got {config.stage1_turns!r}")
    if config.stage1_data not in STAGE1_DATA:
        raise ValueError(f"stage1_data must be one of {STAGE1_DATA}, got {config.stage1_data!r}")
    if config.stage1_data == "qa" and config.stage1_turns == "multi":
        return teacher
    from coma.data.formats import read_conversations
    from coma.data.synth.scenes import caption
    from coma.data.synth.tasks import CAPTION_PROMPTS, conversation
    from coma.demo.diagnostics import world_scenes
    from coma.io import write_jsonl

    path = out / "cache" / f"{teacher.stem}-{config.stage1_data}-{config.stage1_turns}.jsonl"
    if path.is_file():
        return path
    conversations = read_conversations(teacher)
    if config.stage1_data == "caption":
        scenes = world_scenes(world)
        records = [conversation(conv.id, conv.image, [(CAPTION_PROMPTS[0], caption(scenes[conv.image]))])
                   for conv in conversations]  # fmt: skip
    else:
        records = [conversation(f"{conv.id}-t{number}", conv.image, [turn])
                   for conv in conversations for number, turn in enumerate(conv.turns)]  # fmt: skip
    write_jsonl(path, records)
    return path


def stage1(
    config: DemoConfig,
    world: Path,
    data: Path,
    model: Path,
    out: Path,
    seed: int,
    mask_mode: str | None = None,
) -> dict[str, Any]:
    """Compression pre-training from ``model``; ``mask_mode`` overrides the config's (the diagnostics train the
    other mode too)."""
    from coma.train.compress import CompressConfig
    from coma.train.run import run_stage

    settings = _train_settings(
        config, seed, config.stage1_lr, config.stage1_batch_size, num_epochs=config.stage1_epochs
    )
    stage_config = CompressConfig(
        model=str(model), data=[str(data)], image_root=str(world / "images"), out=str(out),
        mask_mode=mask_mode or config.stage1_mask_mode, supervise=config.stage1_supervise, max_length=512,
        train=settings, lora=TINY_MODEL_TRAINING,
    )  # fmt: skip
    return run_stage("compress", stage_config)


def stage2(config: DemoConfig, world: Path, model: Path, out: Path, seed: int, steps: int) -> dict[str, Any]:
    from coma.train.match import MatchConfig
    from coma.train.run import run_stage

    stage_config = MatchConfig(
        model=str(model), data=str(world / "train"), image_root=str(world / "images"), out=str(out),
        block_size=config.batch_size // 2, temperature=config.temperature, symmetric=config.symmetric,
        grad_cache=False,
        query_chunk_size=None, target_chunk_size=None,
        train=_train_settings(config, seed, config.stage2_lr, config.batch_size, max_steps=steps),
        lora=TINY_MODEL_TRAINING,
    )  # fmt: skip
    return run_stage("match", stage_config)


def evaluate_arm(config: DemoConfig, world: Path, model: Path) -> dict[str, Any]:
    from coma.embedder import Embedder
    from coma.eval.runner import evaluate

    embedder = Embedder.from_pretrained(model, device="cpu")
    return evaluate(embedder, world / "eval", world / "images", model / "eval", batch_size=config.eval_batch_size,
                    show_progress=config.worker_progress,
                    limit=config.eval_queries)  # fmt: skip


def diagnose(
    config: DemoConfig, world: Path, model: Path, *, qa_layout: str | None = None, zero_shot: bool = False
) -> dict[str, Any]:
    """What ``model`` stores about held-out images (:mod:`coma.demo.diagnostics`); with ``qa_layout`` also its QA
    accuracy with and without the image, with ``zero_shot`` also its benchmark scores without matching."""
    from coma.demo.diagnostics import held_out_images, model_diagnostics, qa_items

    images = held_out_images(world, config.diagnostic_images)
    result = model_diagnostics(model, world, images, qa_items(images, config.world_seed), qa_layout=qa_layout)
    if zero_shot:
        result["zero_shot"] = summary_row(evaluate_arm(config, world, model))
    return result


def diagnose_cached(config: DemoConfig, world: Path, model: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`diagnose` of a cached model (stage 0), kept beside it: its result never changes."""
    path = model / f"diagnostics-{_key(config.diagnostic_images, config.eval_queries, kwargs)}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    result = diagnose(config, world, model, **kwargs)
    write_json(path, result)
    return result


def chance_scores(world: Path, limit: int | None = None) -> dict[str, float]:
    """Expected strict P@1 of random scores: the mean of 1 / (number of candidates), per column."""
    from coma.data.formats import read_mmeb_eval_dataset
    from coma.eval.metrics import aggregate
    from coma.eval.registry import load_benchmark

    benchmark = load_benchmark(world / "eval")
    per_dataset = {}
    for spec in benchmark.datasets:
        queries = read_mmeb_eval_dataset(world / "eval" / spec.folder, limit=limit)
        chance = float(np.mean([1.0 / len(query.tgt_text) for query in queries]))
        per_dataset[spec.name] = {"p@1": chance, "p@1_ties": chance, "meta_task": spec.meta_task,
                                  "split": spec.split}  # fmt: skip
    return summary_row(aggregate(per_dataset))


def summary_row(scores: dict[str, Any]) -> dict[str, float]:
    row = {task: scores["meta_tasks"][task]["p@1"] for task in META_TASKS if task in scores["meta_tasks"]}
    for column in ("IND", "OOD", "overall"):
        if column in scores:
            row[column] = scores[column]["p@1"]
    return row


def other_mask_mode(mode: str) -> str:
    return "none" if mode == "bottleneck" else "bottleneck"


def run_seed(
    config: DemoConfig, world: Path, data: Path, out: Path, seed: int, base: Path, phases: Phases
) -> dict[str, Any]:
    # Nothing else runs during stage 0, so it gets every worker's core.
    warm = phases.submit(f"seed {seed}: stage 0 (instruction tuning, cached)", stage0, config, world, base, out,
                         seed, threads=config.workers).result()  # fmt: skip
    run_dir = out / f"seed{seed}"
    steps = config.stage2_steps
    mode, other = config.stage1_mask_mode, other_mask_mode(config.stage1_mask_mode)
    results: dict[str, Any] = {"stage0": str(warm)}
    # (a) and stage 1 -> (b) run side by side; (c) needs both stage 1's token count and (a)'s tokens per step.
    future_a = phases.submit(f"seed {seed}: (a) matching only", stage2, config, world, warm,
                             run_dir / "match_only", seed, steps)  # fmt: skip
    future_stage1 = phases.submit(f"seed {seed}: stage 1 (compression)", stage1, config, world, data, warm,
                                  run_dir / "coma_stage1", seed)  # fmt: skip
    diagnostics = {
        "random": phases.submit(f"seed {seed}: diagnostics, random model", diagnose_cached, config, world, base),
        "stage0": phases.submit(f"seed {seed}: diagnostics, stage 0", diagnose_cached, config, world, warm,
                                qa_layout="chat", zero_shot=True),
    }  # fmt: skip
    # Stage 1 with the other mask, for the diagnostics only: what the bottleneck changes in what is stored.
    future_other = phases.submit(f"seed {seed}: stage 1 ({other} mask, diagnostics only)", stage1, config, world,
                                 data, warm, run_dir / f"stage1_{other}", seed, other)  # fmt: skip
    compressed = future_stage1.result()
    future_b = phases.submit(f"seed {seed}: (b) CoMa matching", stage2, config, world, run_dir / "coma_stage1",
                             run_dir / "coma", seed, steps)  # fmt: skip
    diagnostics[f"stage1_{mode}"] = phases.submit(f"seed {seed}: diagnostics, stage 1 ({mode})", diagnose, config,
                                                  world, run_dir / "coma_stage1", qa_layout="compress",
                                                  zero_shot=True)  # fmt: skip
    arms = {"match_only": future_a.result()}
    evaluations = {"match_only": phases.submit(f"seed {seed}: evaluate match_only", evaluate_arm, config, world,
                                               run_dir / "match_only")}  # fmt: skip
    # Compute is counted in tokens through forward + backward; stage 1's tokens buy arm (c) extra matching steps.
    tokens_per_step = arms["match_only"]["tokens"] / max(arms["match_only"]["steps"], 1)
    extra_steps = math.ceil(compressed["tokens"] / max(tokens_per_step, 1))
    future_c = phases.submit(f"seed {seed}: (c) matching only + {extra_steps} steps", stage2, config, world,
                             warm, run_dir / "match_only_compute", seed, steps + extra_steps)  # fmt: skip
    future_other.result()
    diagnostics[f"stage1_{other}"] = phases.submit(f"seed {seed}: diagnostics, stage 1 ({other})", diagnose,
                                                   config, world, run_dir / f"stage1_{other}",
                                                   qa_layout="compress", zero_shot=True)  # fmt: skip
    diagnostics["match_only"] = phases.submit(f"seed {seed}: diagnostics, match_only", diagnose, config, world,
                                              run_dir / "match_only")  # fmt: skip
    for arm, future in (("coma", future_b), ("match_only_compute", future_c)):
        arms[arm] = future.result()
        evaluations[arm] = phases.submit(f"seed {seed}: evaluate {arm}", evaluate_arm, config, world,
                                         run_dir / arm)  # fmt: skip
        diagnostics[arm] = phases.submit(f"seed {seed}: diagnostics, {arm}", diagnose, config, world,
                                         run_dir / arm)  # fmt: skip
    results["compute"] = {"stage1_tokens": compressed["tokens"], "stage2_tokens_per_step": tokens_per_step,
                          "extra_steps": extra_steps,
                          "arm_tokens": {"match_only": arms["match_only"]["tokens"],
                                         "coma": compressed["tokens"] + arms["coma"]["tokens"],
                                         "match_only_compute": arms["match_only_compute"]["tokens"]}}  # fmt: skip
    results["scores"] = {}
    for arm in ARMS:
        scores = evaluations[arm].result()
        results["scores"][arm] = {"summary": summary_row(scores), "datasets": scores["datasets"]}
    results["diagnostics"] = {name: future.result() for name, future in diagnostics.items()}
    return results


def run_demo(config: DemoConfig) -> dict[str, Any]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with worker_pool(config.workers) as pool:
        phases = Phases(pool)
        # The random models need no world: with workers they are built while this process draws it.
        bases = {seed: phases.submit(f"seed {seed}: random tiny model", ensure_base_model, config, out, seed)
                 for seed in range(config.seeds)}  # fmt: skip
        world = phases.run("synthetic world", ensure_world, config, out)
        data = phases.run("stage-1 data (coma generate, scripted teacher)", teacher_data, world, out)
        chance = chance_scores(world, config.eval_queries)
        references = diagnostic_references(config, world)
        per_seed = {seed: run_seed(config, world, data, out, seed, bases[seed].result(), phases)
                    for seed in range(config.seeds)}  # fmt: skip
    table = {arm: _mean_std([per_seed[s]["scores"][arm]["summary"] for s in per_seed]) for arm in ARMS}
    diagnostics = mean_tree([per_seed[s]["diagnostics"] for s in per_seed])
    report = {"config": asdict(config), "world": world.name, "chance": chance, "table": table,
              "diagnostics": diagnostics, **references, "per_seed": per_seed, "phase_seconds": phases.seconds,
              "total_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    write_outputs(out / "report", report, report_markdown, plot_report)
    return report


def write_outputs(stem: Path, result: dict[str, Any], markdown, plot) -> None:
    """``stem``.json, .md (``markdown(result)``, also printed) and .png (``plot(result, path)``)."""
    write_json(stem.with_suffix(".json"), result)
    text = markdown(result)
    atomic_write_text(stem.with_suffix(".md"), text)
    plot(result, stem.with_suffix(".png"))
    print(text)


def _mean_std(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {column: {"mean": float(np.mean([row[column] for row in rows])),
                     "std": float(np.std([row[column] for row in rows]))} for column in rows[0]}  # fmt: skip


def mean_tree(trees: list[Any]) -> Any:
    """The element-wise mean of equally shaped nested dicts of numbers (the seeds' diagnostics)."""
    if isinstance(trees[0], dict):
        return {key: mean_tree([tree[key] for tree in trees]) for key in trees[0]}
    return float(np.mean(trees))


DIAGNOSED = {
    "random": "random model",
    "stage0": "stage 0",
    "stage1_bottleneck": "stage 1, bottleneck",
    "stage1_none": "stage 1, no bottleneck",
    "match_only": ARM_LABELS["match_only"],
    "coma": ARM_LABELS["coma"],
    "match_only_compute": ARM_LABELS["match_only_compute"],
}


def diagnostic_references(config: DemoConfig, world: Path) -> dict[str, dict[str, float]]:
    """What the diagnostics compare against: the QA accuracy of always giving the most frequent answer, and the
    probes' balanced accuracy of a constant guess."""
    from coma.demo.diagnostics import held_out_images, majority_accuracy, probe_chance, qa_items

    images = held_out_images(world, config.diagnostic_images)
    return {
        "qa_majority": majority_accuracy(qa_items(images, config.world_seed)),
        "probe_chance": probe_chance([image.scene for image in images]),
    }


def diagnostics_markdown(
    diagnostics: dict[str, Any], references: dict[str, dict[str, float]], labels: dict[str, str] = DIAGNOSED
) -> list[str]:
    """Two tables: the stage-0 model's QA per question kind, and what every model's embedding stores."""
    from coma.demo.diagnostics import PROBE_GROUPS

    qa_majority = references["qa_majority"]

    qa = diagnostics["stage0"]["qa"]
    kinds = [kind for kind in qa["image"] if kind != "all"] + ["all"]
    lines = [
        "Stage 0's generative QA on held-out images (greedy exact match, %), with the image, with a blank grey",
        "image, and always giving the most frequent answer:",
        "",
        "| | " + " | ".join(kinds) + " |",
        "|" + "---|" * (len(kinds) + 1),
    ]
    for label, row in (("image", qa["image"]), ("blank image", qa["blank"]), ("most frequent", qa_majority)):
        lines.append(f"| {label} | " + " | ".join(f"{100 * row[kind]:.1f}" for kind in kinds) + " |")
    lines += [
        "",
        "What the pooled compression-token embedding of a held-out image stores: linear-probe balanced accuracy (%)",
        "per attribute group, the share of variance in its top direction, zero-shot overall P@1 (%) before any",
        "matching, and QA answered through the compression tokens only (bottleneck mask), with the image / blank:",
        "",
        "| model | " + " | ".join(PROBE_GROUPS) + " | top-direction share | zero-shot P@1 | QA via tokens |",
        "|" + "---|" * (len(PROBE_GROUPS) + 4),
    ]
    for name, label in labels.items():
        if name not in diagnostics:
            continue
        row = diagnostics[name]
        cells = [f"{100 * row['probe'][group]:.1f}" for group in PROBE_GROUPS]
        cells.append(f"{row['top_direction_share']:.3f}")
        cells.append(f"{100 * row['zero_shot']['overall']:.1f}" if "zero_shot" in row else "–")
        if "qa" in row and name != "stage0":
            cells.append(f"{100 * row['qa']['image']['all']:.1f} / {100 * row['qa']['blank']['all']:.1f}")
        else:
            cells.append("–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chance = references["probe_chance"]
    lines.append(
        "| constant guess | " + " | ".join(f"{100 * chance[g]:.1f}" for g in PROBE_GROUPS) + " | | | |"
    )
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    seeds = config["seeds"]
    header = "| arm | " + " | ".join(COLUMNS) + " |"
    lines = [
        f"# coma demo — synthetic world ({report['world']}), {seeds} seed(s)",
        "",
        "Small-scale synthetic reproduction on a tiny random Qwen2-VL-style model: it shows the pipeline and the",
        "comparison, not MMEB numbers. Strict Precision@1 (%), mean"
        + (" ± std over seeds." if seeds > 1 else " of one seed."),
        "",
        header,
        "|" + "---|" * (len(COLUMNS) + 1),
    ]
    for arm in ARMS:
        cells = []
        for column in COLUMNS:
            value = report["table"][arm].get(column)
            if value is None:
                cells.append("–")
            elif seeds > 1:
                cells.append(f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}")
            else:
                cells.append(f"{100 * value['mean']:.1f}")
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    lines.append(
        "| chance | "
        + " | ".join(f"{100 * report['chance'].get(c, float('nan')):.1f}" for c in COLUMNS)
        + " |"
    )
    compute = report["per_seed"][next(iter(report["per_seed"]))]["compute"]
    lines += [
        "",
        f"Stage 1 attention mask: {config['stage1_mask_mode']}.",
        f"Stage 1 processed {compute['stage1_tokens']:,} tokens; arm (c) got {compute['extra_steps']} extra matching "
        f"steps ({compute['stage2_tokens_per_step']:,.0f} tokens each) to match it. Tokens in all: "
        + ", ".join(f"{ARM_LABELS[arm][:3]} {compute['arm_tokens'][arm]:,}" for arm in ARMS)
        + ".",
        "",
        *diagnostics_markdown(report["diagnostics"], report),
        "",
        "Phase wall times (s): "
        + ", ".join(f"{name} {secs:.1f}" for name, secs in report["phase_seconds"].items()),
        f"Total: {report['total_seconds']:.1f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4), dpi=110)
    axes = figure.subplots()
    width = 0.8 / (len(ARMS) + 1)
    positions = np.arange(len(COLUMNS))
    for index, arm in enumerate(ARMS):
        means = [100 * report["table"][arm].get(c, {"mean": np.nan})["mean"] for c in COLUMNS]
        stds = [100 * report["table"][arm].get(c, {"std": 0.0})["std"] for c in COLUMNS]
        axes.bar(positions + index * width, means, width, yerr=stds, label=ARM_LABELS[arm], capsize=2)
    chance = [100 * report["chance"].get(c, np.nan) for c in COLUMNS]
    axes.bar(positions + len(ARMS) * width, chance, width, label="chance", color="lightgrey")
    axes.set_xticks(positions + width * len(ARMS) / 2, COLUMNS)
    axes.set_ylabel("Precision@1 (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=7, loc="upper left")
    axes.set_title("coma demo: synthetic MMEB-style benchmark")
    figure.tight_layout()
    figure.savefig(path)


def load_report(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))
