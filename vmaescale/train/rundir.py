"""One run per output directory: an OS-level lock, and the config check on resume.

The lock is a POSIX record lock (`fcntl.lockf`) on `<output_dir>/.lock`, taken by rank 0
before any process group starts and held for the life of the process: the kernel drops it
when the process dies, however it dies, so a crashed run never leaves a stale lock. POSIX
locks work on local filesystems, NFSv3 (with lockd) and NFSv4; Lustre needs the `flock`
(or `localflock` for one node) mount option. The holder's host, pid and start time are
written into the file so a refused launch can name it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from vmaescale.config import flat_fields

LOCK_FILE = ".lock"

# Fields that change neither the model, the data order nor the optimisation: a resume may
# change them (logged). Prefixes end with "." and cover a whole section.
RESUME_HARMLESS = ("name", "output_dir", "tracking.", "train.max_steps", "train.log_every",
                   "train.checkpoint_every", "train.keep_checkpoints", "train.recon_every",
                   "train.run_steps", "train.max_bad_steps",
                   "train.peak_tflops", "train.time_limit_s", "train.end_margin_s",
                   "train.dist_timeout_s", "data.num_workers", "data.bad_shards",
                   "finetune.eval_every_epochs", "finetune.test_at_end", "finetune.test_shards",
                   "finetune.test_flip", "data.test_num_segment", "data.test_num_crop",
                   "data.test_sampling", "train.check_every", "data.prefetch_batches",
                   "data.dali_pipelines", "model.compile_scope")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (locked, a refused config change, no usable
    checkpoint): a user error, reported in one line like a bad config."""


class RunLock:
    """Exclusive ownership of a run directory for this process (see the module docstring)."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(self._fd)
            os.close(self._fd)
            raise RunDirError(f"{out} is in use by another run ({holder}); wait for it to end, "
                              "or choose another output_dir") from None
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started})
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, info.encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "holder unknown"


def config_changes(stored: dict, new: dict) -> dict[str, tuple]:
    """Every field whose value differs: {'optim.base_lr': (old, new)}."""
    a, b = flat_fields(stored), flat_fields(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def is_harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in RESUME_HARMLESS)


def describe(changes: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_resume_config(stored_path: Path, new: dict, allow_change: bool) -> dict[str, dict]:
    """Compare the stored resolved config with the new one before resuming.

    Returns {'harmless': {...}, 'allowed': {...}} (the changes accepted); raises RunDirError
    for a change that alters the model, the data order or the optimisation, unless
    `allow_change` (launchers: --allow-config-change).
    """
    try:
        stored = json.loads(stored_path.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{stored_path} cannot be read ({e}); the checkpoint's config is unknown. "
                          "Resume with --allow-config-change to accept the new config as it is") from None
    changes = config_changes(stored, new)
    harmless = {k: v for k, v in changes.items() if is_harmless(k)}
    breaking = {k: v for k, v in changes.items() if k not in harmless}
    if breaking and not allow_change:
        raise RunDirError(f"the config changed since {stored_path} was written: {describe(breaking)}. "
                          "These change the model, the data order or the optimisation; resume with "
                          "--allow-config-change to accept them, or use a new output_dir")
    return {"harmless": harmless, "allowed": breaking}
