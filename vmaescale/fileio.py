"""Crash-safe file writes shared by the shard builder and the checkpointer."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, payload: bytes | str) -> None:
    """Write `payload` to `path` via a synced temporary file and a rename."""
    data = payload.encode() if isinstance(payload, str) else payload
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
