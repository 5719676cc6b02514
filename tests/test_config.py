import json
from pathlib import Path

import pytest

from vmaescale.config import DERIVED_DEEPSPEED_KEYS, ConfigError, load_config
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
                                              "tracking.experiment=exp-x",
                                              "deepspeed.zero_optimization.reduce_bucket_size=1000"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.tracking.experiment == "exp-x"
    assert cfg.deepspeed == {"zero_optimization": {"reduce_bucket_size": 1000}}


def test_invalid_json_file_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field,accepted", [
    ("optim.base_lr", "a number in [0.0, 1.0]"),
    ("optim.clip_grad", "a number >= 0.0"),
    ("train.epochs", "a number >= 0.0"),
])
def test_nan_and_infinity_are_refused_from_set_overrides(literal, field, accepted):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.json", [f"{field}={literal}"])
    assert f"{field}: " in str(err.value) and "is not a finite number" in str(err.value)
    assert f"accepted: {accepted}" in str(err.value)


def test_nan_and_infinity_json_literals_are_refused_in_a_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"optim": {"base_lr": NaN}}')
    with pytest.raises(ConfigError, match=r"optim.base_lr: nan is not a finite number"):
        load_config(path)
    path.write_text('{"finetune": {"mixup": Infinity}}')
    with pytest.raises(ConfigError, match=r"finetune.mixup: inf is not a finite number; accepted: a number in \[0.0, 100.0\]"):
        load_config(path)
    path.write_text('{"optim": {"betas": [0.9, NaN]}}')
    with pytest.raises(ConfigError, match=r"optim.betas: \[0.9, nan\] must be two numbers in \[0, 1\)"):
        load_config(path)
    path.write_text('{"deepspeed": {"zero_optimization": {"reduce_bucket_size": Infinity}}}')
    with pytest.raises(ConfigError, match=r"deepspeed.zero_optimization.reduce_bucket_size: inf is not a finite"):
        load_config(path)


def test_a_missing_config_file_or_a_directory_is_a_one_line_config_error(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nowhere.json")
    assert str(err.value) == f"config file {tmp_path / 'nowhere.json'}: not found; expected a JSON run config (see configs/)"
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"config file {tmp_path}: is a directory; expected a JSON run config file"
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object of config sections, got list"):
        load_config(tmp_path / "list.json", ["train.max_steps=1"])
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "binary.json")


@pytest.mark.parametrize("override,message", [
    ("deepspeed.train_batch_size=7", "deepspeed.train_batch_size: derived from train.videos_per_gpu x "
                                     "data.num_sample x train.grad_accum x world size; set those instead"),
    ("deepspeed.train_micro_batch_size_per_gpu=4", "deepspeed.train_micro_batch_size_per_gpu: derived from "
                                                   "train.videos_per_gpu x data.num_sample"),
    ("deepspeed.gradient_accumulation_steps=2", "deepspeed.gradient_accumulation_steps: derived from "
                                                "train.grad_accum; set that instead"),
    ("deepspeed.gradient_clipping=1.0", "deepspeed.gradient_clipping: derived from optim.clip_grad"),
    ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage: derived from train.zero_stage"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16.enabled: precision comes from train.precision"),
    ("deepspeed.bf16.check_grad_overflow=false", "deepspeed.bf16.check_grad_overflow: always on under bf16"),
    ("deepspeed.fp16.enabled=true", "deepspeed.fp16.enabled: precision comes from train.precision"),
    ('deepspeed.optimizer={"type": "SGD"}', "deepspeed.optimizer: the optimizer is AdamW built from optim.*"),
    ('deepspeed.scheduler={"type": "WarmupLR"}', "deepspeed.scheduler: the lr schedule is warmup + cosine"),
    ("deepspeed.bf16=true", "deepspeed.bf16: expected an object, got True"),
    ("deepspeed.zero_optimization=2", "deepspeed.zero_optimization: expected an object, got 2"),
])
def test_deepspeed_passthrough_cannot_set_derived_keys(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.json", [override])
    assert message in str(err.value)


def test_deepspeed_passthrough_keeps_other_zero_and_engine_keys():
    cfg = load_config(CONFIGS / "tiny.json", [
        'deepspeed={"zero_optimization": {"allgather_bucket_size": 2e8, "offload_optimizer": {"device": "cpu"}}, '
        '"bf16": {"immediate_grad_update": false}, "steps_per_print": 5}'])
    ds = deepspeed_config(cfg, world_size=2, precision="bf16")
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["allgather_bucket_size"] == 2e8 and ds["steps_per_print"] == 5
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True, "immediate_grad_update": False}


def leaves(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        out.update(leaves(value, prefix + (key,)) if isinstance(value, dict) else {prefix + (key,): value})
    return out


def test_every_deepspeed_key_derived_from_the_run_config_is_refused_in_the_passthrough():
    """Changing any run-config field that feeds deepspeed_config changes only refused keys."""
    base = load_config(CONFIGS / "tiny.json")
    changed = load_config(CONFIGS / "tiny.json", [
        "train.videos_per_gpu=3", "data.num_sample=3", "train.grad_accum=3", "optim.clip_grad=0.5",
        "train.zero_stage=3", "train.precision=bf16"])
    before = leaves(deepspeed_config(base, world_size=2, precision="fp32"))
    for world, precision in ((2, "bf16"), (5, "fp32")):
        after = leaves(deepspeed_config(changed, world_size=world, precision=precision))
        differing = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert differing and all(k in DERIVED_DEEPSPEED_KEYS for k in differing), differing


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
