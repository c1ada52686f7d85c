"""Recipes in configs/ map 1:1 onto the config dataclasses; CLI flags override recipe fields."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from coma.recipes import add_config_arguments, config_from_args, from_dict
from coma.train.compress import CompressConfig
from coma.train.match import MatchConfig

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
CLASSES = {"compress": CompressConfig, "match": MatchConfig}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_parses(path):
    config_class = CLASSES[path.name.split("_")[0]]
    config = from_dict(config_class, yaml.safe_load(path.read_text()), source=str(path))
    assert config.train.global_batch_size > 0


def test_paper_recipes_hold_the_paper_settings():
    compress = from_dict(
        CompressConfig, yaml.safe_load(Path(CONFIGS[0].parent / "compress_qwen2_5_vl_3b.yaml").read_text())
    )
    assert (compress.num_tokens, compress.train.learning_rate, compress.train.global_batch_size) == (
        32,
        5e-5,
        256,
    )
    assert (compress.lora.r, compress.lora.alpha, compress.lora.dropout, compress.lora.dora) == (
        16,
        64,
        0.1,
        True,
    )
    assert (compress.min_pixels, compress.max_pixels) == (256 * 28 * 28, 1024 * 28 * 28)
    match = from_dict(
        MatchConfig, yaml.safe_load(Path(CONFIGS[0].parent / "match_qwen2_5_vl_7b.yaml").read_text())
    )
    assert (match.train.max_steps, match.train.global_batch_size, match.temperature) == (1500, 1024, 0.03)
    assert (match.query_chunk_size, match.target_chunk_size, len(match.subsets)) == (4, 4, 20)


def test_flags_override_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("temperature: 0.05\ntrain: {learning_rate: 0.001, max_steps: 10}\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MatchConfig)
    args = parser.parse_args(["--train.max-steps", "3", "--model", "m"])
    config = config_from_args(MatchConfig, args, config_file=str(recipe))
    assert (config.temperature, config.train.learning_rate, config.train.max_steps) == (0.05, 0.001, 3)
    assert config.model == "m" and config.train.global_batch_size == 1024  # untouched default


def test_unknown_recipe_field_is_an_error(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train: {learning_rat: 0.1}\n")
    with pytest.raises(ValueError, match="learning_rat"):
        config_from_args(MatchConfig, argparse.Namespace(), config_file=str(recipe))


def test_list_and_dict_flags_as_users_type_them():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MatchConfig)
    args = parser.parse_args(["--subsets", "SUN397, MSCOCO_t2i", "--caps", "SUN397=10,MSCOCO_t2i=20",
                              "--weights", "{SUN397: 2}", "--max-steps", "5", "--learning-rate", "1e-4",
                              "--skip-bad", "--lora-r", "4", "--save-steps", "7"])  # fmt: skip
    config = config_from_args(MatchConfig, args)
    assert config.subsets == ["SUN397", "MSCOCO_t2i"]  # was read character by character
    assert (config.caps, config.weights) == ({"SUN397": 10, "MSCOCO_t2i": 20}, {"SUN397": 2})
    assert (config.train.max_steps, config.train.learning_rate, config.train.save_every) == (5, 1e-4, 7)
    assert config.skip_bad is True and config.lora.r == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["--caps", "SUN397:10"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--caps", "SUN397=ten"])


def test_each_field_is_listed_once_in_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, MatchConfig)
    help_text = parser.format_help()
    assert help_text.count("--train.max-steps MAX_STEPS, --max-steps MAX_STEPS") == 1
    assert help_text.count("--max-steps") == 1  # usage names only the first spelling
    flags = [action.option_strings for action in parser._actions if action.dest == "train.max_steps"]
    assert flags == [["--train.max-steps", "--max-steps"]]


# Qwen3-VL recipes are coma's transfer of the paper's Qwen2.5-VL ones (2B from 3B, 8B from 7B): same values, the
# Qwen3-VL checkpoint, and pixel bounds that keep 256-1024 visual tokens at its 32-px cells (16-px patches, 2 x 2).
QWEN3_COUNTERPARTS = [
    ("compress", "2b", "3b"),
    ("compress", "8b", "7b"),
    ("match", "2b", "3b"),
    ("match", "8b", "7b"),
]


@pytest.mark.parametrize(("stage", "size", "paper_size"), QWEN3_COUNTERPARTS, ids=lambda v: v)
def test_qwen3_recipes_transfer_the_paper_settings(stage, size, paper_size):
    folder = CONFIGS[0].parent
    ours = yaml.safe_load((folder / f"{stage}_qwen3_vl_{size}.yaml").read_text())
    paper = yaml.safe_load((folder / f"{stage}_qwen2_5_vl_{paper_size}.yaml").read_text())
    assert (ours.pop("min_pixels"), ours.pop("max_pixels")) == (256 * 32 * 32, 1024 * 32 * 32)
    assert (paper.pop("min_pixels"), paper.pop("max_pixels")) == (256 * 28 * 28, 1024 * 28 * 28)
    if stage == "compress":
        assert (ours.pop("model"), paper.pop("model")) == (
            f"Qwen/Qwen3-VL-{size.upper()}-Instruct",
            f"Qwen/Qwen2.5-VL-{paper_size.upper()}-Instruct",
        )
    assert ours == paper


@pytest.mark.parametrize(
    "recipe",
    [path for path in CONFIGS if "_qwen" in path.name],
    ids=lambda p: p.name,
)
def test_paper_recipes_give_256_to_1024_visual_tokens(recipe):
    """At each recipe's pixel bounds its family's released processor settings give 256 to 1024 tokens."""
    from coma.backbones import ADAPTERS
    from coma.backbones.tiny import build_bpe_tokenizer, build_processor
    from coma.config import ComaConfig
    from coma.embedder import apply_pixel_bounds

    family = "qwen3_vl" if "_qwen3_vl_" in recipe.name else "qwen2_5_vl"
    processor = build_processor(family, build_bpe_tokenizer(vocab_size=300), real=True)
    bounds = yaml.safe_load(recipe.read_text())
    apply_pixel_bounds(
        processor, ComaConfig(min_pixels=bounds["min_pixels"], max_pixels=bounds["max_pixels"])
    )
    adapter = ADAPTERS[family]
    assert adapter.visual_tokens(processor, 64, 64) == 256  # small images are scaled up
    assert 900 <= adapter.visual_tokens(processor, 4000, 3000) <= 1024  # large ones down (rounded to cells)
    assert adapter.visual_tokens(processor, 4096, 4096) == 1024
    assert 256 <= adapter.visual_tokens(processor, 640, 480) <= 1024
