"""Datasets: layout detection, image/mask pairing, decoding (OpenCV), splits, augmentation.

(being written: see the data helper's task)
"""

from __future__ import annotations

import cv2
import numpy as np

from polyprune.io import InputSpec


def preprocess_image(image_rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (3, S, S): bilinear resize to the model size, /255, mean/std.

    The one preprocessing used by training, evaluation, export checks and inference alike.
    """
    resized = cv2.resize(image_rgb, (spec.size, spec.size), interpolation=cv2.INTER_LINEAR)
    x = resized.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
