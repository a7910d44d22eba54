"""Atomic writes: a failed or interrupted write leaves the previous file, never a truncated one."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.atomic import OutputWriteError, atomic_dir, atomic_path, write_bytes, write_text


def test_a_real_size_limit_stops_the_write_and_keeps_the_previous_file(tmp_path):
    """The file-size rlimit makes write() fail with EFBIG, as a full disk fails with ENOSPC."""
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous good file")
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from helpers.atomic import OutputWriteError, write_bytes
        try:
            write_bytes({str(target)!r}, b"x" * 100_000)
        except OutputWriteError as e:
            print(e)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert proc.returncode == 3, proc.stderr
    assert "the disk is full or a size limit was hit" in proc.stdout and "previous version" in proc.stdout
    assert target.read_bytes() == b"previous good file"
    assert os.listdir(tmp_path) == ["lora.safetensors"]  # the temp file is gone


def test_an_error_in_the_body_keeps_the_previous_file(tmp_path):
    target = write_text(tmp_path / "a.toml", "old = 1\n")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("new = half")
            raise RuntimeError("boom")
    assert target.read_text() == "old = 1\n" and os.listdir(tmp_path) == ["a.toml"]


def test_permission_and_disk_full_errors_get_advice(tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputWriteError, match="Drive's trash"):
        write_bytes(tmp_path / "x.bin", b"1")

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(OutputWriteError, match="permission denied .* is Drive mounted read-write"):
        write_bytes(tmp_path / "x.bin", b"1")


def test_atomic_dir_swaps_whole_folders(tmp_path):
    final = tmp_path / "lora_diffusers"
    with atomic_dir(final) as tmp:
        (tmp / "a.safetensors").write_bytes(b"1")
    with pytest.raises(KeyError):
        with atomic_dir(final) as tmp:
            (tmp / "a.safetensors").write_bytes(b"half")
            raise KeyError("interrupted")
    assert (final / "a.safetensors").read_bytes() == b"1" and os.listdir(tmp_path) == ["lora_diffusers"]
    with atomic_dir(final) as tmp:
        (tmp / "b.safetensors").write_bytes(b"2")
    assert os.listdir(final) == ["b.safetensors"]
