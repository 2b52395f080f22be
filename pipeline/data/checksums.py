"""sha256 checksums of files, computed while the bytes are written instead of by reading the file back.

An extraction writes tens of GB of shards; hashing each shard by reading it back after writing it doubles the
disk traffic. `HashingWriter` hashes the bytes on their way to disk, and `save_npy` uses it for `.npy` shards.
The digest is also remembered for this process, keyed by the file's identity (device, inode, size, mtime), so
that the stage store's completion record (`pipeline/orchestration/store.py: checksum_tree`) can take it from
`recorded_sha256` instead of reading the file a second time. The memory is only consulted while publishing a
stage output the same process has just written; verification always reads files from disk.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import TracebackType

import numpy as np

CHUNK_BYTES = 1 << 20

# (st_dev, st_ino, st_size, st_mtime_ns) of a file this process wrote -> its sha256.
_written: dict[tuple[int, int, int, int], str] = {}


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def file_sha256(path: str | Path, chunk: int = CHUNK_BYTES) -> str:
    """sha256 of a file's bytes, read from disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def recorded_sha256(path: str | Path) -> str | None:
    """The sha256 computed while this process wrote `path`, if the file is still exactly that file (same
    inode, size and modification time); None otherwise."""
    try:
        return _written.get(_identity(os.stat(path)))
    except FileNotFoundError:
        return None


class HashingWriter:
    """A binary file opened for writing that hashes every byte written to it.

    with HashingWriter(path) as out:
        out.write(b"...")
    out.sha256, out.n_bytes   # available after the file is closed
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._digest = hashlib.sha256()
        self.n_bytes = 0
        self.sha256: str | None = None

    def write(self, data: bytes | memoryview) -> int:
        self._digest.update(data)
        written = self._file.write(data)
        self.n_bytes += written
        return written

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        self.sha256 = self._digest.hexdigest()
        _written[_identity(os.stat(self.path))] = self.sha256

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # a half-written file must not be remembered as hashed
            self._file.close()


def save_npy(path: str | Path, array: np.ndarray) -> tuple[str, int]:
    """`np.save` to `path`, hashing the bytes as they are written; returns (sha256, size in bytes).

    np.save streams an array to a file-like object in 16 MiB chunks (it writes to a real file object in one
    call instead, which is why a HashingWriter is passed), so memory stays bounded for large shards."""
    with HashingWriter(path) as out:
        np.save(out, array, allow_pickle=False)
    assert out.sha256 is not None
    return out.sha256, out.n_bytes


# --- content fingerprints of input files (a local model directory) ----------------------------------------


def remembered_sha256(path: str | Path, memo_file: str | Path | None = None) -> str:
    """sha256 of `path`, hashed at most once per version of the file: the digest is kept in `memo_file` (JSON,
    keyed by absolute path) with the file's identity (device, inode, size, mtime) and reused while the file
    still has that identity. Rewriting the file (`save_pretrained` of new weights) gives it a new mtime, so it is
    hashed again. The memo is written atomically; an unreadable one is ignored."""
    import json

    path = Path(path).resolve()
    identity = list(_identity(os.stat(path)))
    memo: dict[str, dict] = {}
    if memo_file is not None and Path(memo_file).is_file():
        try:
            memo = json.loads(Path(memo_file).read_text())
        except (OSError, ValueError):
            memo = {}
    known = memo.get(str(path))
    if known is not None and known.get("identity") == identity:
        return str(known["sha256"])
    digest = recorded_sha256(path) or file_sha256(path)
    if memo_file is not None:
        memo[str(path)] = {"identity": identity, "sha256": digest}
        memo_file = Path(memo_file)
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        partial = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(memo, indent=1, sort_keys=True))
        os.replace(partial, memo_file)
    return digest
