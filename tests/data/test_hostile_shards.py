"""Hostile shard sets, built with the repo's own tools and then damaged.

- A truncated, zero-byte or non-tar file among the tars is found when the loader is built
  (headers and .idx offsets only): data.bad_shards="refuse" stops with one error naming
  it, "skip" leaves it out with one warning naming it and reads the rest.
- Members named with '..' or an absolute path are bad samples on both loaders, reported
  with shard and key (never an empty key), never trained on.
- inspect_shards reports every problem of a shard, and decoding a sample whose .nframes
  says 10**9 keeps memory bounded.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import resource
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from vmaescale.config import DataConfig
from vmaescale.data.inspect import format_report, inspect_shards
from vmaescale.data.loader import ShardSetError, build_loader, open_shard_set
from vmaescale.data.shards import MANIFEST_SCHEMA, dali_index_text, shard_name, tar_problem

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["fallback", "dali"]
DAMAGED = shard_name(1)  # 5 of the 12 samples of the conftest shard sets
DAMAGE_REASONS = {"truncated": "is truncated: member", "zero_bytes": "is empty (0 bytes)",
                  "not_a_tar": "is not a tar (no valid tar header at byte 0"}
UNSAFE_KEYS = ("../escaped", "/abs/escaped", "sub/../escaped")


def data_config(shards: Path, backend: str, **overrides) -> DataConfig:
    base = DataConfig(shards=str(shards), backend=backend, num_frames=4, sampling_rate=4,
                      image_size=32, num_sample=2, num_workers=0, shuffle_buffer=4,
                      test_num_segment=2, test_num_crop=1, short_side=32)
    return dataclasses.replace(base, **overrides)


def copy_of(shards: Path, out: Path) -> Path:
    shutil.copytree(shards, out)
    return out


def damage(tar: Path, kind: str) -> None:
    data = tar.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "zero_bytes": b"",
               "not_a_tar": random.Random(0).randbytes(len(data))}  # same size as the index expects
    tar.write_bytes(damaged[kind])


def manifest_rows(shards: Path) -> list[dict]:
    return pq.read_table(shards / "manifest.parquet").to_pylist()


def rows_outside(shards: Path, tar_name: str) -> set[int]:
    return {i for i, r in enumerate(manifest_rows(shards)) if shard_name(r["shard"]) != tar_name}


def eval_videos(loader) -> list[int]:
    return [v for batch in loader for v in batch["video_index"].tolist()]


def rewrite_tar(tar: Path, samples: list[dict]) -> None:
    """Write `samples` (webdataset dicts) as the tar and rebuild its .idx with the repo's writer."""
    with wds.TarWriter(str(tar)) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if not k.startswith("__url")})
    tar.with_suffix(".idx").write_text(dali_index_text(tar))


def read_samples(tar: Path) -> list[dict]:
    return list(wds.WebDataset(str(tar), shardshuffle=False))


# ---------------------------------------------------------------------------- bad tars


@pytest.fixture(params=sorted(DAMAGE_REASONS))
def damaged_shards(request, vp9_shards, tmp_path) -> tuple[Path, str]:
    """The VP9 shard set with shard-000001.tar truncated, emptied or overwritten by noise."""
    shards = copy_of(vp9_shards, tmp_path / "shards")
    damage(shards / DAMAGED, request.param)
    return shards, request.param


def test_sound_tars_pass_the_check(vp9_shards):
    assert [tar_problem(t) for t in sorted(vp9_shards.glob("*.tar"))] == [None, None, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_refuse_names_the_bad_tar_before_any_pipeline(damaged_shards, backend):
    shards, kind = damaged_shards
    with pytest.raises(ShardSetError) as refused:
        build_loader(data_config(shards, backend), 3, 0, 1, mode="eval")
    message = str(refused.value)
    assert isinstance(refused.value, ValueError) and "\n" not in message
    assert f"{DAMAGED} {DAMAGE_REASONS[kind]}" in message
    assert "data.bad_shards='skip'" in message  # says what else is accepted
    assert shard_name(0) not in message and shard_name(2) not in message


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_leaves_the_bad_tar_out_with_one_line_and_reads_the_rest(damaged_shards, backend,
                                                                       caplog):
    shards, kind = damaged_shards
    with caplog.at_level(logging.WARNING, logger="vmaescale.data.loader"):
        loader = build_loader(data_config(shards, backend, bad_shards="skip"), 3, 0, 1, mode="eval")
    skipped = [r.getMessage() for r in caplog.records if "leaving it out" in r.getMessage()]
    assert len(skipped) == 1 and f"{DAMAGED} {DAMAGE_REASONS[kind]}" in skipped[0]
    assert [t.name for t in loader.shards.tars] == [shard_name(0), shard_name(2)]
    seen = eval_videos(loader)
    good = rows_outside(shards, DAMAGED)
    assert set(seen) == good and len(seen) == 2 * len(good)  # every good video, 2 segments
    assert loader.bad_samples == 0 and loader.failed == []


def test_skip_refuses_when_no_tar_is_left(vp9_shards, tmp_path):
    shards = copy_of(vp9_shards, tmp_path / "shards")
    for tar, kind in zip(sorted(shards.glob("*.tar")), sorted(DAMAGE_REASONS)):
        damage(tar, kind)
    with pytest.raises(ShardSetError, match="every tar in .* is bad .*nothing is left"):
        build_loader(data_config(shards, "dali", bad_shards="skip"), 3, 0, 1, mode="eval")


def test_a_stray_non_tar_file_is_found_without_an_index(vp9_shards, tmp_path, caplog):
    """Random bytes named .tar next to the shards (no .idx): refused, or skipped while DALI
    keeps the index files of the real tars."""
    shards = copy_of(vp9_shards, tmp_path / "shards")
    (shards / "stray.tar").write_bytes(random.Random(1).randbytes(3000))
    with pytest.raises(ShardSetError, match=r"stray\.tar is not a tar"):
        build_loader(data_config(shards, "dali"), 3, 0, 1, mode="eval")
    with caplog.at_level(logging.WARNING, logger="vmaescale.data.loader"):
        loader = build_loader(data_config(shards, "dali", bad_shards="skip"), 3, 0, 1, mode="eval")
    assert "stray.tar is not a tar" in caplog.text
    assert len(loader.shards.index_paths) == len(loader.shards.tars) == 3
    assert sorted(set(eval_videos(loader))) == list(range(12))


def test_a_tar_that_disagrees_with_its_index_is_bad(vp9_shards, tmp_path):
    """A sound tar under another tar's .idx: the headers at the indexed offsets do not match."""
    shards = copy_of(vp9_shards, tmp_path / "shards")
    shutil.copy(shards / shard_name(2), shards / DAMAGED)  # shard 1's .idx stays
    assert f"does not match {DAMAGED.replace('.tar', '.idx')}" in tar_problem(shards / DAMAGED)


def test_a_tar_the_manifest_lists_but_the_directory_lacks(vp9_shards, tmp_path, caplog):
    shards = copy_of(vp9_shards, tmp_path / "shards")
    (shards / DAMAGED).unlink()
    with pytest.raises(ShardSetError, match=f"{DAMAGED} is listed in manifest.parquet but missing"):
        open_shard_set(str(shards), "refuse")
    with caplog.at_level(logging.WARNING, logger="vmaescale.data.loader"):
        kept = open_shard_set(str(shards), "skip")
    assert f"{DAMAGED} is listed in manifest.parquet but missing" in caplog.text
    assert kept.num_videos == 7


# ---------------------------------------------------------------------------- unsafe member names


@pytest.fixture(scope="module")
def unsafe_name_shards(vp9_shards, tmp_path_factory) -> Path:
    """The VP9 set with copies of a good sample stored under '..' / absolute member names in
    shard-000002.tar, listed in the manifest too (so only the name makes them bad)."""
    shards = copy_of(vp9_shards, tmp_path_factory.mktemp("unsafe") / "shards")
    tar = shards / shard_name(2)
    samples = read_samples(tar)
    rewrite_tar(tar, samples + [dict(samples[0], __key__=key) for key in UNSAFE_KEYS])
    with tarfile.open(tar) as opened:
        names = opened.getnames()
    assert "../escaped.webm" in names and "/abs/escaped.webm" in names
    rows = manifest_rows(shards)
    template = next(r for r in rows if r["shard"] == 2)
    rows += [dict(template, key=key) for key in UNSAFE_KEYS]
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), shards / "manifest.parquet")
    return shards


def unsafe_rows(shards: Path) -> set[int]:
    return {i for i, r in enumerate(manifest_rows(shards)) if r["key"] in UNSAFE_KEYS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsafe_member_names_are_bad_samples_in_eval(unsafe_name_shards, backend):
    loader = build_loader(data_config(unsafe_name_shards, backend), 3, 0, 1, mode="eval")
    seen = eval_videos(loader)
    assert set(seen) == set(range(12)) and not set(seen) & unsafe_rows(unsafe_name_shards)
    reasons = dict(loader.failed)
    assert sorted(reasons) == sorted(UNSAFE_KEYS) and "" not in reasons
    assert "'..' component" in reasons["../escaped"] and "'..' component" in reasons["sub/../escaped"]
    assert "absolute path" in reasons["/abs/escaped"]
    assert loader.bad_samples == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsafe_member_names_are_never_trained_on(unsafe_name_shards, backend, caplog):
    loader = build_loader(data_config(unsafe_name_shards, backend), 2, 0, 1)
    with caplog.at_level(logging.WARNING, logger="vmaescale.data.loader"):
        seen = [v for batch in loader for v in batch["video_index"].tolist()]
    assert seen and not set(seen) & unsafe_rows(unsafe_name_shards)
    for key in UNSAFE_KEYS:
        assert f"bad sample {key} in shard {shard_name(2)} skipped" in caplog.text
        assert f"member name {key!r}" in caplog.text


# ---------------------------------------------------------------------------- inspect_shards


@pytest.fixture
def many_problem_shards(vp9_shards, tmp_path) -> Path:
    """shard-000001.tar: its first sample's .nframes says 10**9, its second lacks .cls,
    its third's .json is not JSON; shard-000002.tar is truncated."""
    shards = copy_of(vp9_shards, tmp_path / "shards")
    samples = read_samples(shards / DAMAGED)
    samples[0]["nframes"] = struct.pack("<i", 10**9)
    del samples[1]["cls"]
    samples[2]["json"] = b"{not json"
    rewrite_tar(shards / DAMAGED, samples)
    damage(shards / shard_name(2), "truncated")
    return shards


def test_inspect_reports_every_problem_of_a_shard(many_problem_shards):
    report = inspect_shards(many_problem_shards)
    checks = {s.name: s for s in report.shards}
    assert checks[shard_name(0)].problems == ()
    problems = checks[DAMAGED].problems
    keys = [r["key"] for r in manifest_rows(many_problem_shards) if r["shard"] == 1]
    assert f"sample {keys[0]} .nframes says 1000000000 frames, the manifest 24" in problems
    assert f"sample {keys[0]} decodes to 24 frames; .nframes says 1000000000" in problems
    assert f"sample {keys[1]} has no .cls although its manifest label is set" in problems
    assert any(p.startswith(f"sample {keys[2]} .json does not parse") for p in problems)
    assert len(problems) == 4
    truncated = checks[shard_name(2)].problems
    assert any(p.startswith(f"{shard_name(2)} is truncated") for p in truncated)
    text = format_report(report)
    assert text.count(f"FAILED {DAMAGED}:") == 4 and "1/3 shards OK" in text


def test_inspect_reports_unsafe_member_names(unsafe_name_shards):
    problems = {s.name: s.problems for s in inspect_shards(unsafe_name_shards).shards}
    unsafe = [p for p in problems[shard_name(2)] if "is unsafe: member name" in p]
    assert len(unsafe) == 3 and problems[shard_name(0)] == ()


def _limit_address_space() -> None:
    limit = 2 * 1024**3  # far below what 10**9 frame indices (or frames) would take
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.fixture
def huge_nframes_shards(vp9_shards, tmp_path) -> Path:
    """Only one change: the first sample of shard-000001.tar says .nframes = 10**9, so that
    sample is decoded (a check that stopped at an earlier problem would not reach it)."""
    shards = copy_of(vp9_shards, tmp_path / "shards")
    samples = read_samples(shards / DAMAGED)
    samples[0]["nframes"] = struct.pack("<i", 10**9)
    rewrite_tar(shards / DAMAGED, samples)
    return shards


@pytest.mark.parametrize("decoding", [[], ["--decode-all"]])
def test_inspect_memory_stays_bounded_whatever_nframes_says(huge_nframes_shards, decoding):
    """Under a 2 GiB address-space limit: allocating by the count (10**9 frame indices, as
    the check once did) raises MemoryError within a second."""
    done = subprocess.run([sys.executable, "data_tools/inspect_shards.py", str(huge_nframes_shards),
                           *decoding], cwd=REPO, capture_output=True, text=True, timeout=120,
                          preexec_fn=_limit_address_space)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MemoryError" not in done.stderr
    assert "decodes to 24 frames; .nframes says 1000000000" in done.stdout
    assert ".nframes says 1000000000 frames, the manifest 24" in done.stdout
    assert "2/3 shards OK -- shard set is NOT usable" in done.stdout
