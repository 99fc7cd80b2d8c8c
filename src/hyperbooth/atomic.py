"""File helpers. Writes are atomic: a reader sees the old file or the whole new one, never a part."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hyperbooth.errors import HyperboothError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NO_PERMISSION = (errno.EACCES, errno.EPERM, errno.EROFS)


def _umask() -> int:
    """The process's file-creation mask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(path: Path, error: OSError) -> HyperboothError:
    """One line saying why path could not be written and what to do."""
    reason = (error.strerror or str(error) or type(error).__name__).lower()
    if error.errno in _DISK_FULL:
        return HyperboothError(
            f"cannot write {path}: no space left on device (free some disk space)"
        )
    if error.errno in _NO_PERMISSION:
        return HyperboothError(f"cannot write {path}: {reason} (choose a writable output folder)")
    return HyperboothError(f"cannot write {path}: {reason}")


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` on success, delete it on failure.

    An OSError (a full disk, a read-only folder) becomes a one-line HyperboothError. The file
    gets the permissions a plain open() would give (some writers, safetensors among them,
    create theirs private), so an adapter can be shared with tools run by other users.
    """
    path = Path(path)
    # Same folder as the target so os.replace is a rename, never a cross-device copy.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        if temporary.is_file():
            temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise write_error(path, error) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file atomically."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def unreadable_tensors(
    path: str | os.PathLike[str], error: Exception, hint: str
) -> HyperboothError:
    """The one-line error for a file safetensors cannot read, with what to pass instead."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return HyperboothError(f"not a readable safetensors file: {path} ({reason}); {hint}")


def load_tensors(path: str | os.PathLike[str], hint: str) -> dict:
    """Every tensor of a safetensors file, or a one-line error ending in hint (what to pass)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise unreadable_tensors(path, error, hint) from None


def stored_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-blank lines of a text file of `what` (one per line), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise HyperboothError(f"{what} file not found: {path} (one per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HyperboothError(f"{path} is not UTF-8 text; save the {what} as UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise HyperboothError(f"{path} holds no {what} (one per line)")
    return lines
