"""Inference: `Predictor` turns an RGB image into a probability map at the image's own size.

(torch backend only for now: the deploy helper adds onnxruntime / openvino, folders and video)
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from polyprune.data import preprocess_image
from polyprune.io import InputSpec, load_model


class Predictor:
    """`Predictor(model_or_path).predict(rgb_uint8) -> float32 (H, W) probabilities in [0, 1]`."""

    def __init__(
        self,
        model: str | Path | nn.Module,
        backend: str = "torch",
        threads: int | None = None,
        input_spec: InputSpec | None = None,
        device: str = "cpu",
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.backend = backend
        if isinstance(model, nn.Module):
            self.model = model.eval()
            meta = getattr(model, "polyprune_meta", None)
            self.input_spec = input_spec or (meta.input if meta else InputSpec())
        else:
            self.model = load_model(model, device=device)
            self.input_spec = input_spec or self.model.polyprune_meta.input
        self.device = next(self.model.parameters()).device

    @torch.inference_mode()
    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 preprocessed -> (N, 1, S, S) logits."""
        return self.model(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def predict(self, image_rgb: np.ndarray) -> np.ndarray:
        h, w = image_rgb.shape[:2]
        x = preprocess_image(image_rgb, self.input_spec)[None]
        logits = self.predict_logits(x)[0, 0]
        prob = 1.0 / (1.0 + np.exp(-logits))
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
