"""Reading a user's images safely: files, PIL images or arrays -> model inputs.

Every image goes through ``mmtl_tf.preprocessing`` (the code training used), so the device sees
exactly the arrays the model was meta-trained on. A file that is empty, not an image, truncated
or a decompression bomb raises ImageError naming the file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from mmtl_tf.preprocessing import MAX_IMAGE_PIXELS, Preprocessing, preprocess_array, preprocess_pil

# Files a file manager or an OS leaves in folders; never taken for images.
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


class ImageError(ValueError):
    """An image (file) cannot be used; the message names it."""


def read_image(path, prep: Preprocessing) -> np.ndarray:
    """Decodes and preprocesses one image file to float32 (size, size, 1) in [0, 1]."""
    path = Path(path)
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: the file is empty (0 bytes); replace it with a real image")
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as pil:
                pil.load()
                return preprocess_pil(pil, prep)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({err}); images "
                         f"must have at most {MAX_IMAGE_PIXELS} pixels") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as err:
        # OSError covers missing and truncated files; SyntaxError is what some Pillow
        # decoders raise for a corrupt header.
        raise ImageError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def to_input(image, prep: Preprocessing) -> np.ndarray:
    """One image as float32 (size, size, 1): a file path, a PIL image, a uint8 array (H, W) or
    (H, W, 1|3|4), or an already preprocessed float array of exactly (size, size, 1)."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, prep)
    if isinstance(image, Image.Image):
        return preprocess_pil(image, prep)
    array = np.asarray(image)
    size = int(prep.image_size)
    if array.dtype == np.uint8:
        return preprocess_array(array, prep)
    if array.dtype.kind == "f" and array.shape == (size, size, 1):
        if not np.all(np.isfinite(array)):
            raise ImageError("a preprocessed image array holds non-finite values")
        return array.astype(np.float32)
    raise ImageError(f"an image array of dtype {array.dtype} and shape {array.shape} is neither "
                     f"uint8 pixels nor a preprocessed float array of shape {(size, size, 1)}")


def to_batch(images, prep: Preprocessing) -> np.ndarray:
    """Many images (see ``to_input``) as float32 (B, size, size, 1)."""
    rows = [to_input(image, prep) for image in images]
    if not rows:
        raise ImageError("no images were given")
    return np.stack(rows)


def image_files(folder) -> list[Path]:
    """The files of ``folder`` (not recursive), sorted by name; hidden files are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_NAMES)


def support_folder(folder) -> tuple[list[Path], list[str]]:
    """A support set laid out as ``folder/<class name>/<images>``.

    Returns (image paths, their class names); classes in sorted folder-name order.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"support folder {folder} does not exist or is not a folder")
    stray = image_files(folder)
    if stray:
        raise ImageError(f"{stray[0]}: the support folder must hold one subfolder per class and "
                         f"no loose files; move it into its class's subfolder")
    paths, labels = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = image_files(class_dir)
        if not files:
            raise ImageError(f"class folder {class_dir} holds no images; add at least one image "
                             "of that class or remove the folder")
        paths += files
        labels += [class_dir.name] * len(files)
    return paths, labels


def query_files(items) -> list[Path]:
    """Query images from file paths and/or folders (a folder's files, not recursive)."""
    paths = []
    for item in items:
        item = Path(item)
        if item.is_dir():
            found = image_files(item)
            if not found:
                raise ImageError(f"query folder {item} holds no images")
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            raise ImageError(f"query image {item} does not exist")
    if not paths:
        raise ImageError("no query images were given")
    return paths
