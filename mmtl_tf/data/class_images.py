"""A class-indexed image cache: every image of a split decoded once, grouped by class.

Episode sampling gathers from this cache with tensor indices, so no image is decoded or resized
per episode.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClassImages:
    """Images of one split grouped by class.

    Attributes:
      images: float32 (num_images, size, size, channels), preprocessed; the images of class c are
        ``images[offsets[c] : offsets[c] + counts[c]]``.
      offsets: int64 (num_classes,), first image of each class.
      counts: int64 (num_classes,), images per class (20 for every Omniglot character).
      class_ids: int64 (num_classes,), the dataset's own label of each class (Omniglot: global
        character id - 1), never the episode label.
      groups: int64 (num_classes,), a group per class (Omniglot: alphabet id), -1 when the dataset
        has none.
      group_names: names indexed by group id.
    """

    images: np.ndarray
    offsets: np.ndarray
    counts: np.ndarray
    class_ids: np.ndarray
    groups: np.ndarray
    group_names: tuple[str, ...] = ()

    def __post_init__(self):
        c = len(self.class_ids)
        for name in ("offsets", "counts", "groups"):
            if len(getattr(self, name)) != c:
                raise ValueError(f"ClassImages.{name} has {len(getattr(self, name))} entries, "
                                 f"expected one per class ({c})")
        if c and int(self.offsets[-1] + self.counts[-1]) > len(self.images):
            raise ValueError("ClassImages offsets/counts point past the end of images")

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @classmethod
    def from_labels(cls, images: np.ndarray, labels: np.ndarray, groups_of_label=None,
                    group_names=()) -> "ClassImages":
        """Groups images (M, H, W, C) by integer labels (M,), classes sorted by label."""
        labels = np.asarray(labels, dtype=np.int64)
        order = np.argsort(labels, kind="stable")
        class_ids, counts = np.unique(labels[order], return_counts=True)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if groups_of_label is None:
            groups = np.full(len(class_ids), -1, np.int64)
        else:
            groups = np.asarray([groups_of_label[int(c)] for c in class_ids], np.int64)
        return cls(np.ascontiguousarray(images[order]), offsets, counts.astype(np.int64),
                   class_ids.astype(np.int64), groups, tuple(group_names))

    def select(self, positions) -> "ClassImages":
        """A new cache holding only the classes at ``positions`` (indices into this cache)."""
        positions = np.asarray(positions, dtype=np.int64)
        parts = [self.images[o:o + n] for o, n in zip(self.offsets[positions], self.counts[positions])]
        counts = self.counts[positions]
        images = np.concatenate(parts) if parts else self.images[:0]
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return ClassImages(images, offsets, counts, self.class_ids[positions],
                           self.groups[positions], self.group_names)

    @staticmethod
    def concat(first: "ClassImages", second: "ClassImages") -> "ClassImages":
        """Both caches' classes in one; class ids must not collide."""
        if np.intersect1d(first.class_ids, second.class_ids).size:
            raise ValueError("cannot concatenate ClassImages whose class ids overlap")
        if first.group_names != second.group_names:
            raise ValueError("cannot concatenate ClassImages with different group names")
        images = np.concatenate([first.images, second.images])
        offsets = np.concatenate([first.offsets, second.offsets + len(first.images)])
        return ClassImages(images, offsets, np.concatenate([first.counts, second.counts]),
                           np.concatenate([first.class_ids, second.class_ids]),
                           np.concatenate([first.groups, second.groups]), first.group_names)
