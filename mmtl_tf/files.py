"""File helpers shared by training, export and the device runtime (standard library only).

``atomic_write`` is how every artifact is written (checkpoint metadata, caches, episode files,
ONNX graphs, personal states): a reader sees the old file or the new one, never a partial one.
``replace_folder`` does the same for a whole folder (an export).
"""

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def sha256(source) -> str:
    """Hex SHA-256 of bytes, or of a file (a path) read in 1 MiB blocks."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write, mode: int = 0o644) -> Path:
    """Calls ``write(binary file)`` on a temporary file beside ``path``, syncs it, then renames
    it over ``path``; on any failure the temporary file is removed and ``path`` is untouched.

    ``mode``: the file's permissions (0o644: artifacts meant to be shared; 0o600 for a user's
    data). They are set before the rename, so the file is never visible with other ones,
    whatever the mode of a file it replaces.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    sync_folder(path.parent)
    return path


def sync_folder(folder) -> None:
    """Makes a rename inside ``folder`` durable across a power cut (POSIX; a no-op where
    folders cannot be opened, as on Windows)."""
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


def sync_tree(folder) -> None:
    """fsyncs every file and folder under ``folder``: call before renaming a folder written by
    code that does not sync (TensorFlow's SavedModel writer, Keras), so the rename publishes
    complete files even after a power cut."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        sync_folder(root)


def replace_folder(new, target) -> None:
    """Moves the complete folder ``new`` to ``target``, replacing any folder there; ``target``
    exists at every moment (a reader sees the old folder or the new one).

    On Linux the two folders are exchanged in one step (``renameat2`` with RENAME_EXCHANGE),
    then the old one is removed. Where that is unavailable (other systems, file systems
    without it) the old folder is renamed aside first, which leaves a moment between two
    renames with no folder at ``target``; a failure there renames the old one back, and a crash
    there leaves it recoverable as ``.<name>.old`` beside ``target``.
    """
    new, target = Path(new), Path(target)
    sync_tree(new)
    if not target.exists():
        os.rename(new, target)
        old = None
    elif _exchange(new, target):
        old = new  # the exchange left the old folder at new's path
    else:
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
    sync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths atomically (Linux renameat2); False where it is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def checksum_path(path) -> Path:
    """Where ``write_checksummed`` records the SHA-256 of ``path``: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checksummed(path, data: bytes) -> Path:
    """Writes ``data`` to ``path`` and its SHA-256 to ``<path>.sha256`` in sha256sum's format
    (``sha256sum -c`` checks it), each atomically."""
    atomic_write(path, lambda f: f.write(data))
    line = f"{sha256(data)}  {Path(path).name}\n"
    atomic_write(checksum_path(path), lambda f: f.write(line.encode()))
    return Path(path)


def recorded_sha256(path) -> str | None:
    """The SHA-256 that ``<path>.sha256`` records for ``path``; None when there is none."""
    try:
        fields = checksum_path(path).read_text(encoding="ascii").split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2 or fields[1].lstrip("*") != Path(path).name or len(fields[0]) != 64:
        return None
    return fields[0].lower()
