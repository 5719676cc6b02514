import json
from pathlib import Path

import pytest

from vmaescale.config import ConfigError, load_config
from vmaescale.train.engine import deepspeed_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "b", "l", "h", "g", "b_v1"])
def test_shipped_configs_validate(name):
    load_config(CONFIGS / f"{name}.json")


def test_g_config_follows_the_v2_recipe():
    cfg = load_config(CONFIGS / "g.json")
    assert cfg.model.size == "g" and cfg.model.checkpoint_activations
    assert cfg.train.zero_stage == 2 and cfg.train.precision == "bf16"
    assert cfg.optim.clip_grad == 0.02 and cfg.optim.base_lr == 6e-4
    assert (cfg.train.videos_per_gpu, cfg.data.num_sample) == (32, 4)
    assert (cfg.mask.encoder, cfg.mask.encoder_ratio, cfg.mask.decoder) == ("tube", 0.9, "running_cell")


def test_v1_variant_has_no_decoder_mask_or_repeated_sampling():
    cfg = load_config(CONFIGS / "b_v1.json")
    assert cfg.mask.decoder == "none" and cfg.data.num_sample == 1


@pytest.mark.parametrize("override,message", [
    ("bogus=1", "unknown key(s) ['bogus']"),
    ("train.zero_stage=4", "train.zero_stage: 4 is not one of [0, 1, 2, 3]"),
    ("train.videos_per_gpu=\"many\"", "train.videos_per_gpu: expected int, got 'many'"),
    ("optim.base_lr=-0.1", "optim.base_lr: -0.1 is below the minimum 0.0"),
    ("model.size=XL", "model.size: 'XL' is not one of"),
    ("data.num_frames=15", "data.num_frames: 15 must be even"),
    ("optim.betas=[0.9]", "optim.betas: [0.9] must be two numbers"),
    ("train.nope=1", "train: unknown key(s) ['nope']"),
])
def test_bad_values_name_the_field_value_and_what_is_accepted(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.json", [override])
    assert message in str(err.value)


def test_overrides_reach_any_field_and_parse_json():
    cfg = load_config(CONFIGS / "tiny.json", ["train.max_steps=7", "optim.betas=[0.8,0.9]",
                                              "tracking.experiment=exp-x", "deepspeed.zero_optimization.stage=3"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.tracking.experiment == "exp-x"
    assert cfg.deepspeed == {"zero_optimization": {"stage": 3}}


def test_invalid_json_file_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_deepspeed_config_is_derived_from_the_run_config():
    cfg = load_config(CONFIGS / "g.json", ["train.grad_accum=2"])
    ds = deepspeed_config(cfg, world_size=64, precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 128  # 32 videos x 4 samples
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 128 * 2 * 64
    assert ds["gradient_clipping"] == 0.02
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    assert "optimizer" not in ds and "scheduler" not in ds


def test_deepspeed_passthrough_merges_over_derived_keys():
    cfg = load_config(CONFIGS / "tiny.json", ["deepspeed={\"zero_optimization\": {\"reduce_bucket_size\": 1000}, \"wall_clock_breakdown\": true}"])
    ds = deepspeed_config(cfg, world_size=2, precision="fp32")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["stage"] == 2  # derived key kept
    assert ds["wall_clock_breakdown"] is True and ds["gradient_clipping"] == 0.0


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "b.json")
    cfg.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["model"]["size"] == "B"
