"""Finding the official Omniglot zips and extracting them safely.

A zip is looked for in one place chosen explicitly (the ``source_dir`` argument, else the
``MMTL_OMNIGLOT_DIR`` environment variable), else in the project's shared data folder, else it is
downloaded. Extraction checks every member before writing anything and publishes the result with
one atomic rename, so a folder that exists is always a complete, checked extraction.

No TensorFlow here: the download is a callable handed in by the caller (the TFDS download manager).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import mmtl_tf
from mmtl_tf.files import sha256

_LOG = logging.getLogger(__name__)
ENV_VAR = "MMTL_OMNIGLOT_DIR"
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/{stem}.zip"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Omniglot PNGs are under 1 KB; the cap keeps a hostile zip (a decompression bomb) harmless.
MAX_MEMBER_BYTES = 1 << 20
NUM_CHARACTERS = 1623
NUM_DRAWERS = 20
# The part of a member's path below the top folder: <Alphabet>/characterNN/IIII_DD.png.
_IMAGE_PATH = re.compile(
    r"(?P<alphabet>[^/\\]+)/character(?P<character>\d{2})/(?P<char_id>\d{4})_(?P<drawer>\d{2})\.png"
)
_FIX = (
    f"Set {ENV_VAR} (or pass source_dir=...) to a folder holding the official Omniglot zips "
    "(images_background.zip, images_evaluation.zip, images_background_small1.zip, "
    "images_background_small2.zip)."
)


class OmniglotSourceError(ValueError):
    """An Omniglot zip is missing, corrupt or unsafe; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of the extracted layout; the numbers are the 1-based ones of the file names."""

    path: Path
    alphabet: str
    character: int  # characterNN within its alphabet, 1-based
    char_id: int  # global character id IIII, 1..1623
    drawer: int  # DD, 1..20

    @property
    def key(self) -> str:
        """Unique and stable across runs: the file name ``IIII_DD``."""
        return f"{self.char_id:04d}_{self.drawer:02d}"


def shared_data_dir() -> Path:
    """The project's shared data folder: ``<repo root>/../shared/data/omniglot``."""
    return Path(mmtl_tf.__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def locate_zip(
    stem: str,
    source_dir: str | os.PathLike | None = None,
    download: Callable[[str], os.PathLike | str] | None = None,
) -> Path:
    """Returns the path of ``<stem>.zip`` (e.g. stem ``images_background``).

    An explicit folder (``source_dir``, else ``$MMTL_OMNIGLOT_DIR``) is the only place looked at
    when given, so a wrong choice is reported rather than silently replaced. Otherwise the shared
    folder is tried, then ``download(url)`` (which returns the downloaded file's path).
    """
    explicit = _explicit_dir(source_dir)
    if explicit is not None:
        return _zip_in_explicit_dir(stem, *explicit)
    tried = []
    shared = shared_data_dir() / f"{stem}.zip"
    if shared.is_file():
        return shared
    tried.append(f"{shared} (the project's shared data folder): not found")
    url = DOWNLOAD_URL.format(stem=stem)
    error = None
    if download is None:
        tried.append(f"{url}: no download was attempted (no downloader given)")
    else:
        # Offline, the TFDS download manager retries for minutes before it gives up; say why.
        _LOG.warning("%s.zip not found locally; downloading %s (set %s)", stem, url, ENV_VAR)
        try:
            return Path(download(url))
        except Exception as err:  # any download failure: reported below with the other places
            error = err
            tried.append(f"{url}: download failed ({type(err).__name__}: {err})")
    places = "\n  - ".join([f"source_dir and ${ENV_VAR}: not set", *tried])
    raise OmniglotSourceError(f"Cannot find {stem}.zip. Tried:\n  - {places}\n{_FIX}") from error


def _explicit_dir(source_dir) -> tuple[Path, str] | None:
    if source_dir is not None and os.fspath(source_dir) != "":
        return Path(source_dir).expanduser(), "source_dir"
    from_env = os.environ.get(ENV_VAR, "")
    if from_env:
        return Path(from_env).expanduser(), f"${ENV_VAR}"
    return None


def _zip_in_explicit_dir(stem: str, folder: Path, origin: str) -> Path:
    where = f"{origin}={folder}"
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise OmniglotSourceError(f"{where} {problem}. {_FIX}")
    candidate = folder / f"{stem}.zip"
    if candidate.is_file():
        return candidate
    content = sorted(p.name for p in folder.iterdir())
    held = "it is empty" if not content else "it holds: " + ", ".join(content[:10])
    raise OmniglotSourceError(f"{where} has no {stem}.zip ({held}). {_FIX}")


def extract_zip(zip_path: str | os.PathLike, extract_root: str | os.PathLike, stem: str) -> Path:
    """Extracts an Omniglot zip under ``extract_root``; returns the ``<stem>`` layout folder.

    The destination is named after the zip's content hash, so a finished extraction of the same
    bytes is reused and a different zip never is. Every member is checked first (path inside the
    target, no links, expected layout, size cap), then read (CRC-checked) and its PNG signature
    verified, all in a temporary sibling folder that is renamed into place only when complete.
    Raises OmniglotSourceError naming the zip (and the member) on any problem.
    """
    zip_path = Path(zip_path)
    extract_root = Path(extract_root)
    if not zip_path.is_file():
        raise OmniglotSourceError(f"{zip_path} does not exist or is not a file. {_FIX}")
    final = extract_root / f"{stem}-{sha256(zip_path)[:16]}"
    if final.is_dir():
        return final / stem
    extract_root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=extract_root))
    try:
        _extract_checked(zip_path, partial, stem)
        try:
            os.replace(partial, final)
        except OSError:
            if not final.is_dir():  # not another process finishing the same extraction first
                raise
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return final / stem


def _extract_checked(zip_path: Path, dest: Path, stem: str) -> None:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            files = _checked_members(zip_path, archive.infolist(), stem)
            for info in files:
                data = _read_png(zip_path, archive, info)
                target = dest / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    except zipfile.BadZipFile as err:
        raise OmniglotSourceError(
            f"{zip_path} is not a readable zip file ({err}): it is corrupt or truncated. "
            f"Delete it and fetch it again from {DOWNLOAD_URL.format(stem=stem)}."
        ) from err


def _checked_members(zip_path: Path, infos: list[zipfile.ZipInfo], stem: str) -> list:
    """Returns the file members after checking all members; nothing has been written yet."""
    files, seen = [], set()
    for info in infos:
        name = info.filename
        parts = name.rstrip("/").split("/")
        if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\\" in name or any(
            part in ("", ".", "..") for part in parts
        ):
            raise OmniglotSourceError(f"{zip_path}: member {name!r} escapes the target folder.")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise OmniglotSourceError(f"{zip_path}: member {name!r} is a symbolic link.")
        if name in seen:
            raise OmniglotSourceError(f"{zip_path}: member {name!r} appears twice.")
        seen.add(name)
        if info.is_dir():
            continue
        if parts[0] != stem or parse_image_path("/".join(parts[1:])) is None:
            raise OmniglotSourceError(
                f"{zip_path}: member {name!r} is not an image of the Omniglot layout "
                f"{stem}/<Alphabet>/characterNN/IIII_DD.png. Use the official zip."
            )
        if info.file_size > MAX_MEMBER_BYTES:
            raise OmniglotSourceError(
                f"{zip_path}: member {name!r} claims {info.file_size} bytes, more than the "
                f"{MAX_MEMBER_BYTES}-byte cap for an Omniglot image."
            )
        files.append(info)
    if not files:
        raise OmniglotSourceError(f"{zip_path} holds no Omniglot images. Use the official zip.")
    return files


def _read_png(zip_path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as member:
            # Reading to the end makes zipfile check the CRC; +1 catches a lying size field.
            data = member.read(MAX_MEMBER_BYTES + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise OmniglotSourceError(
            f"{zip_path}: member {info.filename!r} is corrupt ({type(err).__name__}: {err}). "
            "Delete the zip and fetch it again."
        ) from err
    if len(data) > MAX_MEMBER_BYTES:
        raise OmniglotSourceError(f"{zip_path}: member {info.filename!r} is larger than it claims.")
    if not data.startswith(PNG_SIGNATURE):
        raise OmniglotSourceError(f"{zip_path}: member {info.filename!r} is not a PNG image.")
    return data


def parse_image_path(relative: str) -> tuple[str, int, int, int] | None:
    """``'Greek/character03/0396_07.png'`` -> (alphabet, character, char_id, drawer), 1-based.

    Returns None when the path is not of the layout or a number is out of range.
    """
    match = _IMAGE_PATH.fullmatch(relative)
    if match is None:
        return None
    character, char_id, drawer = (int(match[k]) for k in ("character", "char_id", "drawer"))
    if character < 1 or not 1 <= char_id <= NUM_CHARACTERS or not 1 <= drawer <= NUM_DRAWERS:
        return None
    return match["alphabet"], character, char_id, drawer


def iter_images(layout_dir: str | os.PathLike) -> Iterator[ImageRecord]:
    """Yields the images of an extracted ``<stem>`` folder, sorted by path (deterministic)."""
    layout_dir = Path(layout_dir)
    if not layout_dir.is_dir():
        raise OmniglotSourceError(f"{layout_dir} does not exist; extract the zip first.")
    for path in sorted(layout_dir.glob("*/character*/*.png")):
        parsed = parse_image_path(path.relative_to(layout_dir).as_posix())
        if parsed is None:
            raise OmniglotSourceError(f"{path} is not an image of the Omniglot layout.")
        yield ImageRecord(path, *parsed)
