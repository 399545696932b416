"""Image preprocessing shared by the training pipeline and the on-device runtime.

numpy and pillow only: ``mmtl_tf.ondevice`` imports this module, so it must never import
TensorFlow. Training images and a user's images go through exactly this code, which is what
makes the on-device model see the same arrays it was meta-trained on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

# Pillow's own default limit is ~89 Mpixels (a warning) and twice that an error; a few-shot
# image never needs more than this, and refusing early keeps a decompression bomb harmless.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a raw image becomes a model input.

    Attributes:
      image_size: output side in pixels; images are resized to (image_size, image_size).
      ink_as_one: Omniglot draws black ink on white paper; True maps ink to 1.0 and paper to 0.0.
      channels: 1 (grayscale). Colour images are converted with ITU-R 601-2 luma.
    """

    image_size: int = 28
    ink_as_one: bool = True
    channels: int = 1

    def __post_init__(self):
        if not 4 <= int(self.image_size) <= 1024:
            raise ValueError(
                f"image_size={self.image_size} is out of range; use a side between 4 and 1024 "
                "pixels (28 is the Omniglot default, 105 the original size)."
            )
        if self.channels != 1:
            raise ValueError(f"channels={self.channels} is not supported; only 1 (grayscale) is.")

    def to_dict(self) -> dict:
        return {
            "image_size": int(self.image_size),
            "channels": int(self.channels),
            "ink_as_one": bool(self.ink_as_one),
            "resample": "box",
            "scale": "x/255 in [0, 1]; with ink_as_one, 1 - x/255",
            "dtype": "float32",
            "layout": "NHWC",
        }


def preprocess_array(image: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """Maps one uint8 image (H, W) or (H, W, C) to float32 (size, size, 1) in [0, 1]."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        pil = Image.fromarray(image, mode="L")
    elif image.ndim == 3 and image.shape[-1] in (3, 4):
        pil = Image.fromarray(image[..., :3], mode="RGB").convert("L")
    else:
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    return preprocess_pil(pil, prep)


def preprocess_pil(pil: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Maps one PIL image of any mode and size to float32 (size, size, 1) in [0, 1]."""
    if pil.mode.startswith("I") or pil.mode == "F":
        pil = _grey_to_8_bit(pil)
    if pil.mode != "L":
        if pil.mode in ("RGBA", "LA", "P", "PA"):
            # Transparent pixels are paper: composite onto white before dropping alpha.
            rgba = pil.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            pil = Image.alpha_composite(white, rgba)
        pil = pil.convert("L")
    size = int(prep.image_size)
    if pil.size != (size, size):
        pil = pil.resize((size, size), Image.Resampling.BOX)
    x = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    if prep.ink_as_one:
        x = np.float32(1.0) - x
    return x[:, :, None]


def _grey_to_8_bit(pil: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and floating-point grey images as 8-bit "L", rescaled.

    Pillow's own ``convert("L")`` clips these at 255: a 16-bit scan turns white and a float
    image in [0, 1] black. Full scale is 65535 for "I;16*", 1.0 for "F", and for "I" (which
    Pillow also uses for 16-bit files) 255 when every value fits in 8 bits, else 65535.
    Values outside [0, full scale] are refused rather than guessed at.
    """
    values = np.asarray(pil, dtype=np.float64)
    if pil.mode == "F":
        full = 1.0
    elif pil.mode == "I" and values.size and values.max() <= 255:
        full = 255.0
    else:
        full = 65535.0
    in_range = values.size == 0 or (np.isfinite(values).all() and values.min() >= 0
                                    and values.max() <= full)
    if not in_range:
        raise ValueError(f"a {pil.mode} image with values from {values.min()} to {values.max()} "
                         f"is outside [0, {full:g}]; save it as an 8- or 16-bit grey or colour "
                         "image")
    return Image.fromarray(np.round(values * (255.0 / full)).astype(np.uint8), mode="L")
