"""Light affine jitter of meta-training images: a random rotation, scale, shear and shift of
every image, drawn with stateless random ops (a pure function of the seed, like the episodes).

Strength j scales every range: rotation up to +-15j degrees, scale 1 +- 0.15j, shear +- 0.15j,
shift +- 2j pixels. The background (each image's top-left pixel, Omniglot's uniform paper)
fills what the distortion brings in from outside the image.
"""

from __future__ import annotations

import math

import tensorflow as tf

DEGREES, SCALE, SHEAR, SHIFT = 15.0, 0.15, 0.15, 2.0  # at strength 1


def random_affine(images, seed, strength: float):
    """``images`` (..., H, W, C) each distorted by its own random affine map; ``seed`` a
    shape-(2,) int tensor."""
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))  # (B, H, W, C)
    count = tf.shape(flat)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)

    def draw(i, size, half_width):
        return tf.random.stateless_uniform(size, seeds[i], -half_width, half_width)

    angle = draw(0, [count], strength * DEGREES * math.pi / 180)
    scale = 1.0 + draw(1, [count], strength * SCALE)
    shear = draw(2, [count], strength * SHEAR)
    shift = draw(3, [count, 2], strength * SHIFT)
    return tf.reshape(affine(flat, angle, scale, shear, shift), shape)


def affine(images, angle, scale, shear, shift):
    """Images (B, H, W, C) under the affine maps about their centres: output pixel p samples
    the input at c + A (p - c) - shift, A = R(angle) [[1, shear], [0, 1]] / scale (bilinear);
    angle in radians, shift (B, 2) in pixels (x, y). Identity parameters return the images."""
    height, width = images.shape[1], images.shape[2]
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a00, a01, a10, a11 = cos, cos * shear - sin, sin, sin * shear + cos
    a02 = cx - a00 * cx - a01 * cy - shift[:, 0]
    a12 = cy - a10 * cx - a11 * cy - shift[:, 1]
    zeros = tf.zeros_like(angle)
    transforms = tf.stack([a00, a01, a02, a10, a11, a12, zeros, zeros], axis=1)  # (B, 8)
    background = images[:, :1, :1, :]  # (B, 1, 1, C)
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=images - background, transforms=transforms, output_shape=[height, width],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return moved + background
