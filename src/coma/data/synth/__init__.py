"""A deterministic synthetic multimodal world in the exact on-disk formats of the real data (DESIGN §2.5).

``generate_world(out_dir, seed=0, size="default", image_size=84)`` writes stage-0 and stage-1 conversations,
MMEB-train subsets, an MMEB-eval benchmark with IND and OOD datasets, and ``world.json``.
"""

from coma.data.synth.render import render_scene
from coma.data.synth.scenes import Scene, SceneObject, caption, sample_scene
from coma.data.synth.tasks import EVAL_SPECS, PRESETS, TRAIN_SUBSETS, build_world
from coma.data.synth.writer import generate_world

__all__ = [
    "EVAL_SPECS",
    "PRESETS",
    "TRAIN_SUBSETS",
    "Scene",
    "SceneObject",
    "build_world",
    "caption",
    "generate_world",
    "render_scene",
    "sample_scene",
]
