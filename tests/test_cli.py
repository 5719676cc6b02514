"""User errors of `vmaescale`, the launchers and data_tools: one line on stderr, a non-zero
exit, no traceback unless --debug (or VMAESCALE_DEBUG=1). The real commands run in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmaescale.cli import build_parser, error_text
from vmaescale.models import interop
from vmaescale.models.flops import parse_mask_arg

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VMAESCALE_DEBUG"}
    if debug_env:
        env["VMAESCALE_DEBUG"] = "1"
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def one_line_error(done: subprocess.CompletedProcess, prefix: str) -> str:
    """The single stderr line of a failed command (asserting exit status 2 and no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def assert_traceback(done: subprocess.CompletedProcess, exception: str) -> None:
    assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr, done.stderr
    assert exception in done.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- vmaescale


def test_flops_refuses_a_mask_ratio_outside_0_1_in_one_line():
    line = one_line_error(run("-m", "vmaescale.cli", "flops", "--mask", "tube:1.5"), "vmaescale flops: error: ")
    assert "tube:1.5" in line and "1.5" in line and "[0, 1)" in line


def test_debug_flag_or_env_shows_the_traceback():
    assert_traceback(run("-m", "vmaescale.cli", "flops", "--mask", "tube:1.5", "--debug"), "ValueError")
    assert_traceback(run("-m", "vmaescale.cli", "flops", "--decoder-mask", "running_cell:2", debug_env=True),
                     "ValueError")


@pytest.mark.parametrize("text", ["tube:1", "tube:-0.1", "random:nan", "frame:inf", "running_cell:1.0"])
def test_mask_ratio_outside_0_1_is_refused_naming_value_and_range(text):
    with pytest.raises(ValueError, match=r"ratio .* is outside the accepted range \[0, 1\)"):
        parse_mask_arg(text)
    assert parse_mask_arg("tube:0.9") == ("tube", 0.9) and parse_mask_arg("none") == ("none", 0.0)


def test_import_and_export_of_missing_paths_are_one_line_errors(tmp_path):
    line = one_line_error(run("-m", "vmaescale.cli", "import-checkpoint", str(tmp_path / "no.pth"),
                              str(tmp_path / "out")), "vmaescale import-checkpoint: error: ")
    assert "no.pth" in line
    line = one_line_error(run("-m", "vmaescale.cli", "export-hf", str(tmp_path), str(tmp_path / "hf")),
                          "vmaescale export-hf: error: ")
    assert "is not a vmaescale checkpoint directory" in line


def test_bad_arguments_are_one_line_errors():
    line = one_line_error(run("-m", "vmaescale.cli", "flops", "--frames", "many"), "vmaescale flops: error: ")
    assert "--frames" in line and "'many'" in line and "--help" in line
    one_line_error(run("-m", "vmaescale.cli"), "vmaescale: error: ")


def test_help_shows_defaults(capsys):
    for argv in (["flops", "--help"], ["import-checkpoint", "--help"]):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args(argv)
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "(default: tube:0.9)" in text and "(default: 224)" in text and "(default: False)" in text
    assert "(default: None)" not in text


def test_interop_keeps_only_library_functions():
    assert not any(hasattr(interop, name) for name in
                   ("add_import_command", "add_export_command", "run_import", "run_export"))


def test_error_text_is_one_line():
    assert error_text(KeyError("no such key")) == "no such key"
    assert error_text(ValueError("first\n  second\n")) == "first; second"


# ---------------------------------------------------------------- launchers and data tools


# Runs the pretrain launcher, then fails unless no trainer, DeepSpeed or process group came up.
NOTHING_STARTED = ("import sys; from vmaescale.train.launch import main; code = main(sys.argv[1:], 'pretrain'); "
                   "started = [m for m in ('deepspeed', 'vmaescale.train.trainer') if m in sys.modules]; "
                   "dist = sys.modules.get('torch.distributed'); "
                   "started += ['process group'] if dist and dist.is_initialized() else []; "
                   "assert not started, started; sys.exit(code)")


def test_launcher_with_a_missing_config_fails_in_one_line():
    line = one_line_error(run("launch/pretrain.py", "--config", "/nonexistent.json"),
                          "launch/pretrain.py: config error: ")
    assert "/nonexistent.json: not found" in line
    one_line_error(run("-c", NOTHING_STARTED, "--config", "/nonexistent.json"), "launch/pretrain.py: ")
    line = one_line_error(run("launch/finetune.py", "--config", "configs"), "launch/finetune.py: config error: ")
    assert "configs: is a directory" in line


def test_launcher_refuses_derived_deepspeed_keys_and_nan_before_starting_anything():
    line = one_line_error(run("-c", NOTHING_STARTED, "--config", "configs/tiny.json",
                              "--set", "deepspeed.train_batch_size=7"), "launch/pretrain.py: config error: ")
    assert "deepspeed.train_batch_size: derived from train.videos_per_gpu" in line
    line = one_line_error(run("-c", NOTHING_STARTED, "--config", "configs/tiny.json",
                              "--set", "optim.base_lr=NaN"), "launch/pretrain.py: config error: ")
    assert "optim.base_lr: nan is not a finite number" in line


def test_launcher_debug_shows_the_traceback():
    assert_traceback(run("launch/pretrain.py", "--config", "/nonexistent.json", "--debug"), "ConfigError")


def test_launcher_usage_error_is_one_line():
    line = one_line_error(run("launch/post_pretrain.py"), "launch/post_pretrain.py: error: ")
    assert "--config" in line


def test_data_tool_error_is_one_line(tmp_path):
    line = one_line_error(run("data_tools/inspect_shards.py", str(tmp_path / "none")),
                          "data_tools/inspect_shards.py: error: ")
    assert "manifest.parquet" in line
