"""On-device personalisation: numpy, onnxruntime and pillow only (never TensorFlow).

    model = load("exported/omniglot")                    # verifies every file's SHA-256
    personal = model.adapt_folder("my_support")         # one subfolder of images per class
    personal.predict(["query.png"])                     # [(class name, probability)]
    personal.status                                     # "ok", or which earlier step was kept
    personal.save("me.personal")                        # atomic, 0600; load_personal(folder, path)
"""

from mmtl_tf.ondevice.images import ImageError
from mmtl_tf.ondevice.personal import PersonalModel, PersonalStateError
from mmtl_tf.ondevice.runtime import (AdaptationError, AdaptationWarning, ExportError,
                                      ExportedModel, load, load_personal)

__all__ = ["load", "load_personal", "ExportedModel", "PersonalModel", "ImageError",
           "AdaptationError", "AdaptationWarning", "ExportError", "PersonalStateError"]
