"""The classes of a task family: Omniglot, a TFDS dataset or a folder of class subfolders.

Every source is split into train / validation / test classes that never mix: Omniglot by its
protocol (validation alphabets held out of the background characters, test on the evaluation
characters), a TFDS dataset or a folder by a fixed permutation of its classes
(``HELD_OUT`` of them for validation, as many for test). Images are decoded at the family's
``image_size`` and brought to the model's input size here, so families of different
resolutions meet in one meta-batch.

Every error names the family and the fix, and is raised while the samplers are built: before
any training step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.data.episodes import EpisodeSampler
from mmtl_tf.preprocessing import MAX_IMAGE_PIXELS, Preprocessing, preprocess_pil

PARTS = ("train", "validation", "test")
HELD_OUT = 0.2  # of a TFDS dataset's or folder's classes, for validation; as many for test
SPLIT_SEED = 0  # fixed: every run sees the same class split


def family_classes(family, part: str, model_size: int, ink_as_one: bool = True,
                   data_dir=None, source_dir=None) -> tuple[ClassImages, bool]:
    """(classes of ``part`` at the model's input size, whether rotation classes apply) of a
    FamilyConfig. Raises ValueError (or FileNotFoundError) naming the family."""
    if part not in PARTS:
        raise ValueError(f"part={part!r} is unknown; choose one of {PARTS}")
    kind, location = family.source_parts
    prep = Preprocessing(family.image_size or model_size, ink_as_one)
    try:
        if kind == "omniglot":
            classes = _omniglot(location, part, prep, data_dir, source_dir)
        elif kind == "tfds":
            from mmtl_tf.data.omniglot import load_class_images  # imports TFDS: only when used

            classes = class_split(load_class_images(location, "train", prep, data_dir), part)
        else:
            classes = class_split(read_folder_classes(location, prep), part)
    except (ValueError, OSError) as err:
        raise _named(family, err) from err
    return fit_to_model(classes, model_size), bool(family.rotations) and part == "train"


def family_sampler(family, part: str, model_size: int, ink_as_one: bool = True, data_dir=None,
                   source_dir=None) -> EpisodeSampler:
    """The EpisodeSampler of a FamilyConfig's ``part`` (see ``family_classes``); a family whose
    ways, shots or queries its classes cannot give is a ValueError naming the family."""
    classes, rotations = family_classes(family, part, model_size, ink_as_one, data_dir,
                                        source_dir)
    try:
        return EpisodeSampler(classes, family.ways, family.shots, family.queries,
                              family.within_alphabet, rotations)
    except ValueError as err:
        raise _named(family, err, f"{part} classes: ") from err


def held_out_samplers(families, part: str, model_size: int, ink_as_one: bool = True,
                      data_dir=None, source_dir=None) -> tuple[dict, dict]:
    """({family name: EpisodeSampler of its held-out ``part`` classes}, {family name: why it
    has none}) for "validation" or "test": a family whose source holds out too few classes
    for its ways (a small folder or TFDS dataset) is left out with its one-line reason
    instead of stopping the others. A missing file still raises."""
    if part not in PARTS[1:]:
        raise ValueError(f"part={part!r} is not a held-out part; choose 'validation' or 'test'")
    samplers, missing = {}, {}
    for family in families:
        try:
            samplers[family.name] = family_sampler(family, part, model_size, ink_as_one,
                                                   data_dir, source_dir)
        except ValueError as err:  # a missing file is a FileNotFoundError: it propagates
            missing[family.name] = str(err)
    return samplers, missing


def _named(family, err, where: str = "") -> Exception:
    """``err`` as one line naming the family (a missing file stays a FileNotFoundError)."""
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
    kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
    return kind(f"family {family.name!r} (source {family.source}): {where}{message}")


def _omniglot(split: str, part: str, prep, data_dir, source_dir) -> ClassImages:
    from mmtl_tf.data.omniglot import load_omniglot_classes
    from mmtl_tf.data.splits import hold_out_validation, omniglot_split

    if not split:
        return omniglot_split("background", part, prep, data_dir, source_dir)[0]
    if part == "test":
        return load_omniglot_classes("test", prep, data_dir, source_dir)
    return hold_out_validation(load_omniglot_classes(split, prep, data_dir, source_dir), part)


def class_split(classes: ClassImages, part: str) -> ClassImages:
    """The ``part`` of a dataset's classes under a fixed permutation: ``HELD_OUT`` of them
    (rounded down) for validation, as many for test, the rest for training. With fewer than
    5 classes nothing is held out and only "train" exists."""
    held = int(classes.num_classes * HELD_OUT)
    if part != "train" and held == 0:
        raise ValueError(f"{classes.num_classes} classes are too few to hold out {part} classes "
                         f"(a {part} part needs at least {int(np.ceil(1 / HELD_OUT))} classes)")
    order = np.random.default_rng(SPLIT_SEED).permutation(classes.num_classes)
    chosen = {"validation": order[:held], "test": order[held:2 * held],
              "train": order[2 * held:]}[part]
    return classes.select(np.sort(chosen))


def fit_to_model(classes: ClassImages, size: int, channels: int = 1) -> ClassImages:
    """The classes with images resized to (size, size) (area averaging when shrinking,
    bilinear when enlarging) and brought to ``channels`` (grey <-> colour)."""
    images = classes.images
    if images.shape[1:3] != (size, size):
        import tensorflow as tf

        method = "area" if images.shape[1] > size else "bilinear"
        images = np.concatenate([
            tf.image.resize(images[i:i + 4096], (size, size), method=method).numpy()
            for i in range(0, len(images), 4096)]).clip(0.0, 1.0).astype(np.float32)
    if images.shape[-1] != channels:
        if channels == 1:  # ITU-R 601-2 luma, as Preprocessing converts colour
            images = images[..., :3] @ np.asarray([[0.299], [0.587], [0.114]], np.float32)
        else:
            images = np.repeat(images[..., :1], channels, axis=-1)
    if images is classes.images:
        return classes
    return ClassImages(np.ascontiguousarray(images), classes.offsets, classes.counts,
                       classes.class_ids, classes.groups, classes.group_names)


IGNORED = (".", "_")  # hidden files and folders (.DS_Store, __MACOSX) are not classes or images


def read_folder_classes(folder, prep: Preprocessing) -> ClassImages:
    """A folder of class subfolders (the subfolder name is the class) as ClassImages.

    Refuses, naming the file: fewer than two classes, an empty class, a file that is not a
    readable image, and images of different modes (e.g. grey and colour) in one folder.
    """
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (it should hold one subfolder of "
                                "images per class)")
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(IGNORED))
    if len(class_dirs) < 2:
        raise ValueError(f"{folder} holds {len(class_dirs)} class subfolder(s); a family needs "
                         "at least 2 (one subfolder of images per class)")
    images, labels, modes = [], [], {}
    for label, class_dir in enumerate(class_dirs):
        files = sorted(f for f in class_dir.iterdir() if f.is_file() and not f.name.startswith(IGNORED))
        if not files:
            raise ValueError(f"class folder {class_dir} holds no images")
        for path in files:
            try:
                with Image.open(path) as image:
                    if image.width * image.height > MAX_IMAGE_PIXELS:
                        raise ValueError(f"{image.width}x{image.height} pixels is too large")
                    image.load()
                    modes.setdefault(image.mode, path)
                    images.append(preprocess_pil(image, prep))  # (size, size, 1)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
                raise ValueError(f"{path} is not a readable image ({err}); remove or "
                                 "convert it") from err
            labels.append(label)
    if len(modes) > 1:
        seen = ", ".join(f"{mode} ({path})" for mode, path in modes.items())
        raise ValueError(f"{folder} mixes image modes: {seen}; convert every image to one mode")
    return ClassImages.from_labels(np.stack(images), np.asarray(labels))
