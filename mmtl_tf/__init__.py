"""mmtl_tf: meta-learning with Keras 3 and TensorFlow.

Importing the package is cheap and does not import TensorFlow; the TensorFlow parts live in
submodules (``mmtl_tf.data``, ``mmtl_tf.meta``, ...) and ``mmtl_tf.ondevice`` needs only numpy,
onnxruntime and pillow.
"""

__version__ = "0.1.0"
