"""File helpers shared by training, export and the device runtime (standard library only).

``atomic_write`` is how every artifact is written (checkpoint metadata, caches, episode files,
ONNX graphs, personal states): a reader sees the old file or the new one, never a partial one.
"""

import hashlib
import os
import tempfile
from pathlib import Path


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path, write) -> Path:
    """Calls ``write(binary file)`` on a temporary file beside ``path``, syncs it, then renames
    it over ``path``; on any failure the temporary file is removed and ``path`` is untouched."""

    def save(tmp):
        with open(tmp, "wb") as f:
            write(f)

    return atomic_save(path, save)


def atomic_save(path, save) -> Path:
    """``atomic_write`` for writers that take a file name (Keras' ``save_weights``): calls
    ``save(temporary path)``, a name beside ``path`` that ends as ``path`` does, then syncs the
    file and renames it over ``path``; on any failure ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                               dir=path.parent)
    os.close(fd)
    try:
        save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
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
