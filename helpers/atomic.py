"""Atomic file writes: every output goes to a temp file in the same folder, then is renamed.

A run killed mid-write (a Colab disconnect, SIGKILL, a full Drive) leaves either the previous file or
the new one, never a truncated one. Disk-full and permission errors become `OutputWriteError` with a
message that says what to do; the temp file is removed and the previous file is kept.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


class OutputWriteError(OSError):
    """Writing an output failed (disk full, no permission, ...); the previous file is intact."""


def _advice(err: OSError, path: Path) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"could not write {path}: the disk is full or a size limit was hit ({err.strerror}). Free some space (on Colab: empty "
                f"Drive's trash, delete old checkpoints or states) or point output_dir at a disk with room. "
                f"The previous version of the file, if any, is intact.")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"could not write {path}: permission denied ({err.strerror}). Choose an output folder you can "
                f"write to (on Colab: is Drive mounted read-write?). The previous version, if any, is intact.")
    return (f"could not write {path}: {err}. Check that the disk (or Drive) has free space and the folder is "
            f"writable. The previous version of the file, if any, is intact.")


def tmp_path_for(path: str | os.PathLike) -> Path:
    """The temp name used while `path` is being written: same folder (so the rename is atomic), unique per process."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temp path to write to; on success it replaces `path`, on any error it is removed.

    The body writes the temp file by any means (PIL, safetensors, a library's save). OSErrors become
    `OutputWriteError` with advice; other errors propagate unchanged after the cleanup.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)
    except OSError as err:
        _unlink_quietly(tmp)
        if isinstance(err, OutputWriteError):
            raise
        raise OutputWriteError(err.errno, _advice(err, path)) from err
    except RuntimeError as err:
        _unlink_quietly(tmp)
        if _is_write_failure(err):
            raise OutputWriteError(errno.EIO, _advice(OSError(errno.EIO, str(err)), path)) from err
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _is_write_failure(err: RuntimeError) -> bool:
    """torch.save's zip writer raises RuntimeError("... failed writing file ...") on a full disk."""
    text = str(err).lower()
    return "failed writing" in text or "file write failed" in text or "unexpected pos" in text


def _unlink_quietly(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write text atomically (UTF-8 by default); returns the path."""
    return write_bytes(path, text.encode(encoding))


def save_safetensors(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """`safetensors.torch.save_file`, atomically; returns the path."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder to fill; on success it replaces the folder `path` (old one removed after the swap)."""
    final = Path(path)
    tmp = final.with_name(f"{final.name}.{os.getpid()}{TMP_SUFFIX}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        replace_dir(tmp, final)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OutputWriteError):
            raise
        raise OutputWriteError(err.errno, _advice(err, final)) from err
    except RuntimeError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_write_failure(err):
            raise OutputWriteError(errno.EIO, _advice(OSError(errno.EIO, str(err)), final)) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished temp folder into place. The old folder is renamed aside first and removed last,
    so at every moment either the old or the new complete folder exists under a known name."""
    old = final.with_name(f"{final.name}.{os.getpid()}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
