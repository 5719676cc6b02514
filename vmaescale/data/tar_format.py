"""Reading a shard's tar and DALI index: member names, index files, cheap tar checks.

No PyAV here (nor in anything it imports): the DALI path and the shard-set checks import
this, and only the shard builder (`vmaescale.data.shards`) and the fallback decode need PyAV.
"""

from __future__ import annotations

import functools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

_TAR_BLOCK_BYTES = 512
_DALI_INDEX_VERSION = "v1.2"


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-000000.tar, ..."""
    return f"shard-{index:06d}.tar"


def split_member_name(name: str) -> tuple[str, str]:
    """(sample base name, extension) split at the first dot of the file name, as wds2idx does."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1:]


def dali_index_text(tar_path: Union[str, Path]) -> str:
    """DALI's webdataset index of a tar (the text `wds2idx` writes, format v1.2)."""
    samples: list[list[str]] = []
    last_base = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            base, ext = split_member_name(member.name)
            if not member.isreg() or not base or base.endswith("/"):
                continue
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if base == last_base:
                samples[-1].append(entry)
            else:
                samples.append([entry])
                last_base = base
    if not samples:
        raise ValueError(f"{tar_path} holds no files; DALI cannot index an empty shard")
    return f"{_DALI_INDEX_VERSION} {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


# ---------------------------------------------------------------------------- reading checks


@dataclass(frozen=True)
class IndexedMember:
    """One member listed in a DALI index file: where its data lies in the tar."""

    ext: str
    offset: int  # of the data; the member's tar header is the 512 bytes before it
    size: int
    name: str


def read_dali_index(index_path: Union[str, Path]) -> list[IndexedMember]:
    """Every member of a DALI index file (format v1.2, as `dali_index_text` writes it).

    Raises ValueError naming what is malformed."""
    index_path = Path(index_path)
    lines = index_path.read_text(errors="replace").splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != _DALI_INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"{index_path.name} starts with {(lines or [''])[0][:40]!r}; expected "
                         f"'{_DALI_INDEX_VERSION} <samples>'")
    if int(header[1]) != len(lines) - 1:
        raise ValueError(f"{index_path.name} announces {header[1]} samples but lists {len(lines) - 1}")
    members = []
    for number, line in enumerate(lines[1:], 2):
        fields = line.split()
        if not fields or len(fields) % 4 or not all(f.isdigit() for f in fields[1::4] + fields[2::4]):
            raise ValueError(f"{index_path.name} line {number} is {line[:60]!r}; expected "
                             "'ext offset size name' per member")
        members += [IndexedMember(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                    for i in range(0, len(fields), 4)]
    return members


def _tar_header_at(file, position: int) -> tarfile.TarInfo:
    """The tar header block at byte `position`; raises tarfile.HeaderError when there is none."""
    file.seek(position)
    return tarfile.TarInfo.frombuf(file.read(_TAR_BLOCK_BYTES), "utf-8", "surrogateescape")


def _padded_end(offset: int, size: int) -> int:
    return offset + -(-size // _TAR_BLOCK_BYTES) * _TAR_BLOCK_BYTES


def _indexed_members_problem(file, file_bytes: int, index_path: Path) -> Optional[str]:
    """Whether every member the index lists lies inside the file behind a matching header."""
    try:
        members = read_dali_index(index_path)
    except (OSError, ValueError) as e:
        return f"its index is unusable: {e}"
    for member in members:
        if member.offset < _TAR_BLOCK_BYTES:
            return (f"does not match {index_path.name}: {member.name} at byte {member.offset} "
                    "leaves no room for its tar header")
        if member.offset + member.size > file_bytes:
            return (f"is truncated: member {member.name} ends at byte {member.offset + member.size} "
                    f"(per {index_path.name}) but the file has {file_bytes} bytes")
        try:
            header = _tar_header_at(file, member.offset - _TAR_BLOCK_BYTES)
        except tarfile.HeaderError as e:
            return (f"does not match {index_path.name}: no tar header for {member.name} at byte "
                    f"{member.offset - _TAR_BLOCK_BYTES} ({e})")
        if header.size != member.size:
            return (f"does not match {index_path.name}: the header of {member.name} says "
                    f"{header.size} bytes, the index {member.size}")
    return None


def _walked_members_problem(tar_path: Path, file_bytes: int) -> Optional[str]:
    """Without an index: walk the tar headers (no data is read) and check the last one ends it."""
    last = None
    try:
        with tarfile.open(tar_path) as tar:
            for last in tar:
                if last.offset_data + last.size > file_bytes:
                    return (f"is truncated: member {last.name} ends at byte "
                            f"{last.offset_data + last.size} but the file has {file_bytes} bytes")
    except (OSError, tarfile.TarError) as e:
        return f"is not a readable tar ({e})"
    if last is None:
        return "holds no members"
    with open(tar_path, "rb") as file:
        file.seek(_padded_end(last.offset_data, last.size))
        end = file.read(_TAR_BLOCK_BYTES)
    if len(end) < _TAR_BLOCK_BYTES or end.count(0) != _TAR_BLOCK_BYTES:
        return f"is truncated: no end-of-archive block after its last member {last.name}"
    return None


def tar_problem(tar_path: Union[str, Path]) -> Optional[str]:
    """Why `tar_path` is not a readable shard, or None. Cheap: headers only, nothing decoded.

    Checks that the file exists, is not empty, starts with a tar header, and that every
    member its `.idx` lists ends inside the file behind a tar header of the same size
    (without an `.idx`: that the walked headers end inside the file, before an
    end-of-archive block). The reason reads after the file name: "x.tar <reason>".

    The answer is kept per process for the tar and its `.idx` as they are on disk (path,
    size, mtime, inode), so the checks before the process group, at the train loader and at
    every validation loader read each tar's headers once."""
    tar_path = Path(tar_path).absolute()
    return _tar_problem_of(tar_path, _file_identity(tar_path), _file_identity(tar_path.with_suffix(".idx")))


def _file_identity(path: Path) -> Optional[tuple]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=1 << 16)
def _tar_problem_of(tar_path: Path, tar_identity: Optional[tuple], index_identity: Optional[tuple]) -> Optional[str]:
    """tar_problem, computed (the identities only key the cache)."""
    try:
        file_bytes = tar_path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if file_bytes == 0:
        return "is empty (0 bytes)"
    index_path = tar_path.with_suffix(".idx")
    try:
        with open(tar_path, "rb") as file:
            try:
                _tar_header_at(file, 0)
            except tarfile.HeaderError as e:
                return f"is not a tar (no valid tar header at byte 0: {e})"
            if index_path.is_file():
                return _indexed_members_problem(file, file_bytes, index_path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return _walked_members_problem(tar_path, file_bytes)


def member_name_problem(key: str) -> Optional[str]:
    """Why a sample's tar member name (its key, extension removed) is unsafe, or None."""
    if not key:
        return "member name has an empty key; accepted: a relative name such as '000001_clip'"
    if key.startswith("/"):
        return f"member name {key!r} is an absolute path; accepted: a relative name without '..'"
    if ".." in key.split("/"):
        return f"member name {key!r} has a '..' component; accepted: a relative name without '..'"
    return None
