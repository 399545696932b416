"""The Omniglot TFDS builder ``mmtl_omniglot`` and class-indexed image arrays read from TFDS.

The builder mirrors TFDS's own ``omniglot`` (same features, split names and alphabet ids) but reads
the zips through ``sources`` (local folders first, checked extraction) and adds ``drawer_id`` so
that a class's images can be put in drawer order explicitly. One builder config per source zip
lets a caller build only what it needs; ``all`` (the default) builds the four splits together.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmtl_tf.data import sources
from mmtl_tf.data.class_images import ClassImages
from mmtl_tf.files import atomic_write
from mmtl_tf.preprocessing import Preprocessing, preprocess_array

_LOG = logging.getLogger(__name__)

# Sorted union of the 30 background and 20 evaluation alphabets: the ids TFDS's own omniglot uses,
# identical in every split and config. Hardcoded so a config that sees one zip still knows them all.
ALPHABETS = (
    "Alphabet_of_the_Magi", "Angelic", "Anglo-Saxon_Futhorc", "Arcadian", "Armenian",
    "Asomtavruli_(Georgian)", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta",
    "Balinese", "Bengali", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Braille",
    "Burmese_(Myanmar)", "Cyrillic", "Early_Aramaic", "Futurama", "Ge_ez", "Glagolitic",
    "Grantha", "Greek", "Gujarati", "Gurmukhi", "Hebrew",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)", "Japanese_(katakana)",
    "Kannada", "Keble", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "Malayalam", "Manipuri",
    "Mkhedruli_(Georgian)", "Mongolian", "N_Ko", "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sanskrit", "Sylheti", "Syriac_(Estrangelo)",
    "Syriac_(Serto)", "Tagalog", "Tengwar", "Tibetan", "Tifinagh", "ULOG",
)  # fmt: skip
SPLIT_STEMS = {
    "train": "images_background",
    "test": "images_evaluation",
    "small1": "images_background_small1",
    "small2": "images_background_small2",
}
# Global character ids (IIII) each split may hold: a stray evaluation character in a background
# zip would leak test classes into meta-training, so it stops the build instead.
SPLIT_CHAR_IDS = {"train": (1, 964), "test": (965, 1623), "small1": (1, 964), "small2": (1, 964)}
# The smallest config holding each split, used by load_omniglot_classes.
SPLIT_CONFIGS = {
    "train": "background",
    "test": "evaluation",
    "small1": "small1",
    "small2": "small2",
}
CACHE_DIR_NAME = "mmtl_omniglot_cache"


@dataclasses.dataclass(eq=False)
class MmtlOmniglotConfig(tfds.core.BuilderConfig):
    """A subset of the splits ``train``, ``test``, ``small1``, ``small2``."""

    splits: tuple[str, ...] = ()


class MmtlOmniglot(tfds.core.GeneratorBasedBuilder):
    """Omniglot from the official zips; ``source_dir`` overrides where they are looked for."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Features of TFDS omniglot 3.0.0 plus drawer_id; local sources."}
    BUILDER_CONFIGS = [
        MmtlOmniglotConfig(name="all", splits=tuple(SPLIT_STEMS), description="All four splits."),
        MmtlOmniglotConfig(name="background", splits=("train",), description="images_background"),
        MmtlOmniglotConfig(name="evaluation", splits=("test",), description="images_evaluation"),
        MmtlOmniglotConfig(name="small1", splits=("small1",), description="5-alphabet subset 1"),
        MmtlOmniglotConfig(name="small2", splits=("small2",), description="5-alphabet subset 2"),
    ]

    # TFDS 4.9.10 finds a builder's code through the optional importlib_resources package, which it
    # does not declare (tensorflow/datasets#11212); naming the file here avoids that lookup.
    code_path = epath.Path(__file__)

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(105, 105, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(num_classes=sources.NUM_CHARACTERS),
                "alphabet": tfds.features.ClassLabel(names=ALPHABETS),
                "alphabet_char_id": np.int64,  # characterNN - 1 within the alphabet
                "drawer_id": np.int64,  # DD - 1, 0..19
            }),
            supervised_keys=("image", "label"),
            homepage="https://github.com/brendenlake/omniglot/",
            citation="Lake, Salakhutdinov, Tenenbaum (2015), Science 350(6266):1332-1338.",
        )

    def _split_generators(self, dl_manager):
        # Extracted under the TFDS download folder (inside data_dir), never beside the sources.
        extract_root = Path(dl_manager.download_dir) / "extracted" / self.name
        generators = {}
        for split in self.builder_config.splits:
            stem = SPLIT_STEMS[split]
            zip_path = sources.locate_zip(stem, self._source_dir, download=dl_manager.download)
            layout_dir = sources.extract_zip(zip_path, extract_root, stem)
            generators[split] = self._generate_examples(layout_dir, SPLIT_CHAR_IDS[split])
        return generators

    def _generate_examples(self, layout_dir: Path, char_ids: tuple[int, int]):
        """Yields (``IIII_DD``, features) for ``layout_dir``; ``char_ids`` the allowed id range."""
        for record in sources.iter_images(layout_dir):
            problem = None
            if record.alphabet not in ALPHABETS:
                problem = f"unknown alphabet {record.alphabet!r}"
            elif not char_ids[0] <= record.char_id <= char_ids[1]:
                problem = f"character id {record.char_id} is outside this split's {char_ids}"
            if problem:
                message = f"{record.path}: {problem}; use the official zip."
                raise sources.OmniglotSourceError(message)
            yield record.key, {
                "image": os.fspath(record.path),
                "label": record.char_id - 1,
                "alphabet": record.alphabet,
                "alphabet_char_id": record.character - 1,
                "drawer_id": record.drawer - 1,
            }


def load_omniglot_classes(
    split: str,
    prep: Preprocessing,
    data_dir: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> ClassImages:
    """Omniglot ``split`` (train, test, small1, small2) as ClassImages, 20 drawers per class.

    Builds the TFDS dataset into ``data_dir`` (TFDS's default when None) if needed, then caches
    the preprocessed arrays in ``<data_dir>/mmtl_omniglot_cache/<split>_<size>_ink<0|1>.npz``
    and reads that file on later calls with the same split and preprocessing.
    """
    if split not in SPLIT_CONFIGS:
        raise ValueError(f"unknown Omniglot split {split!r}; use one of {sorted(SPLIT_CONFIGS)}")
    builder = MmtlOmniglot(config=SPLIT_CONFIGS[split], data_dir=data_dir, source_dir=source_dir)
    cache = _cache_path(builder.data_dir_root, split, prep)
    _prepare(builder)
    # The cache is valid only for this exact dataset and preprocessing.
    split_info = builder.info.splits[split]
    meta = {
        "dataset": builder.info.full_name,
        "split": split,
        "num_examples": int(split_info.num_examples),
        "num_bytes": int(split_info.num_bytes),
        "preprocessing": prep.to_dict(),
    }
    classes = _read_cache(cache, meta)
    if classes is None:
        start = time.perf_counter()
        classes = _read_classes(builder, split, prep, "image", "label", "alphabet", "drawer_id")
        _check_all_drawers(classes, split)
        _write_cache(cache, classes, meta)
        _LOG.info("read %s in %.1f s; cached in %s", split, time.perf_counter() - start, cache)
    return classes


def _prepare(builder) -> None:
    """Builds the TFDS dataset once, saying which zip it reads instead of TFDS's own
    "Downloading and preparing dataset Unknown size" lines and progress bars."""
    if builder.is_prepared():
        return
    zips = [str(sources.locate_zip(SPLIT_STEMS[split], builder._source_dir))
            for split in builder.builder_config.splits]
    print(f"preparing Omniglot {builder.builder_config.name} once from {', '.join(zips)} "
          f"into {builder.data_dir_root}")
    # TFDS prints to stdout and draws tqdm bars on stderr: neither is wanted here.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        builder.download_and_prepare()


def load_class_images(
    name: str,
    split: str,
    prep: Preprocessing,
    data_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> ClassImages:
    """Any TFDS image classification dataset as ClassImages (any number of images per class).

    ``name`` is a TFDS name such as ``"mnist"`` or ``"mmtl_omniglot/small1"``. Images keep the
    dataset's reading order within a class; ``groups`` is all -1. Not cached.
    """
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(
            f"TFDS has no dataset named {name!r}; tfds.list_builders() lists the known names."
        ) from err
    builder.download_and_prepare()
    return _read_classes(builder, split, prep, image_key, label_key)


def _read_classes(builder, split, prep, image_key, label_key, group_key=None, order_key=None):
    """Decodes ``split`` once and sorts its images by (label, order_key or reading order)."""
    keys = [k for k in (image_key, label_key, group_key, order_key) if k is not None]
    missing = sorted(set(keys) - set(builder.info.features.keys()))
    if missing:
        raise ValueError(
            f"{builder.name} has no feature {missing}; its features are "
            f"{sorted(builder.info.features.keys())}"
        )
    images, columns = [], {k: [] for k in keys[1:]}
    for batch in _numpy_batches(builder, split, keys, image_key):
        images.extend(preprocess_array(image, prep) for image in batch[image_key])  # (S, S, 1)
        for key, column in columns.items():
            column.append(batch[key])
    if not images:
        raise ValueError(f"split {split!r} of {builder.name} holds no examples")
    labels = np.concatenate(columns[label_key]).astype(np.int64)
    orders = np.concatenate(columns[order_key]) if order_key else np.arange(len(labels))
    order = np.lexsort((orders, labels))  # by label, then order key; from_labels keeps it
    group_of_label = None
    if group_key:
        group_of_label = {}
        for label, group in zip(labels.tolist(), np.concatenate(columns[group_key]).tolist()):
            if group_of_label.setdefault(label, group) != group:
                raise ValueError(f"{builder.name} {split!r}: class {label} spans {group_key}s")
    return ClassImages.from_labels(
        np.stack([images[i] for i in order]),  # (num_images, S, S, 1)
        labels[order],
        group_of_label,
        group_names=builder.info.features[group_key].names if group_key else (),
    )


def _numpy_batches(builder, split, keys, image_key):
    """Yields dicts of numpy arrays with a leading example axis, in the split's reading order."""
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda example: {k: example[k] for k in keys})
    # Per-element iteration costs ~0.3 ms in tf.data (10 s for Omniglot's train split); batches
    # of fixed-shape images cut that to ~2 s. Images of varying shape go one at a time.
    fixed_shape = None not in builder.info.features[image_key].shape
    return tfds.as_numpy(dataset.batch(256 if fixed_shape else 1))


def _check_all_drawers(classes: ClassImages, split: str) -> None:
    bad = classes.class_ids[classes.counts != sources.NUM_DRAWERS]
    if bad.size:
        raise ValueError(
            f"Omniglot {split!r}: characters {bad[:10].tolist()} (label = id - 1) do not have "
            f"{sources.NUM_DRAWERS} drawers; rebuild from the official zips."
        )


def _cache_path(data_dir_root, split: str, prep: Preprocessing) -> Path:
    name = f"{split}_{int(prep.image_size)}_ink{int(prep.ink_as_one)}.npz"
    return Path(data_dir_root) / CACHE_DIR_NAME / name


def _read_cache(path: Path, meta: dict) -> ClassImages | None:
    """The cached arrays, or None when absent or made from other data or preprocessing."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            if json.loads(str(npz["meta"])) != meta:
                _LOG.info("cache %s was made from other data or preprocessing; rebuilding", path)
                return None
            fields = {k.name: npz[k.name] for k in dataclasses.fields(ClassImages)}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        # Derived data: an unreadable cache is rebuilt (and overwritten), never trusted.
        _LOG.warning("cache %s is unreadable (%s); rebuilding", path, err)
        return None
    fields["group_names"] = tuple(str(n) for n in fields["group_names"])
    return ClassImages(**fields)


def _write_cache(path: Path, classes: ClassImages, meta: dict) -> None:
    """Writes a temporary file then renames it, so a reader never sees a partial cache."""
    arrays = {k.name: getattr(classes, k.name) for k in dataclasses.fields(ClassImages)}
    arrays["group_names"] = np.asarray(classes.group_names, dtype=str)
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
    atomic_write(path, lambda f: np.savez(f, **arrays))
