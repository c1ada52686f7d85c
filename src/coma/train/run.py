"""Entry points shared by ``coma compress`` and ``coma match``: run a stage, or merge one of its checkpoints."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from coma.recipes import from_dict, to_dict
from coma.train.loop import (
    SHARDED_DIR,
    DistInfo,
    init_distributed,
    latest_checkpoint,
    load_sharded_trainable,
    seed_everything,
    train,
)
from coma.train.setup import count_parameters, save_merged
from coma.train.trainable import load_trainable_state

# stage name -> (module, config class, task class)
STAGES = {
    "compress": ("coma.train.compress", "CompressConfig", "CompressTask"),
    "match": ("coma.train.match", "MatchConfig", "MatchTask"),
}


def stage_classes(stage: str) -> tuple[type, type]:
    module_name, config_name, task_name = STAGES[stage]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, task_name)


def run_stage(stage: str, config: Any, resume: bool = False) -> dict[str, Any]:
    config.validate()
    _, task_class = stage_classes(stage)
    dist_info = init_distributed(config.train.device)
    seed_everything(config.train.seed)  # LoRA and pooling heads are initialised randomly
    task = task_class(config, dist_info)
    if dist_info.is_main:
        trainable, total = count_parameters(task.module)
        print(f"{stage}: {task.total_steps} steps, {trainable:,} of {total:,} parameters trainable "
              f"({dist_info.world_size} process(es), {dist_info.device})")  # fmt: skip
    return train(
        task,
        config.train,
        config.out,
        dist_info=dist_info,
        resume=resume,
        run_config={"stage": stage, "config": to_dict(config)},
        description=stage,
    )


def merge_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Write a plain model folder from a training output folder (its newest checkpoint) or one checkpoint."""
    path = Path(path)
    checkpoint = path if (path / "trainer_state.json").is_file() else latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(
            f"no checkpoint found at {path} (looked for trainer_state.json or checkpoints/)"
        )
    run_dir = checkpoint.parent.parent
    run_config_file = run_dir / "run_config.json"
    if not run_config_file.is_file():
        raise FileNotFoundError(
            f"{run_config_file} is missing: cannot tell which base model {checkpoint} belongs to"
        )
    run_config = json.loads(run_config_file.read_text(encoding="utf-8"))
    config_class, task_class = stage_classes(run_config["stage"])
    config = from_dict(config_class, run_config["config"], source=str(run_config_file))
    task = task_class(config, DistInfo(), with_data=False)
    if (checkpoint / SHARDED_DIR).is_dir():
        load_sharded_trainable(checkpoint, task.module)
    else:
        load_trainable_state(
            task.module, load_file(str(checkpoint / "trainable.safetensors")), source=str(checkpoint)
        )
    return save_merged(task.embedder, out)
