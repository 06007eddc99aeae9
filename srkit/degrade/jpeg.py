"""JPEG compression artefacts by a real encode/decode round trip through OpenCV's libjpeg, one image at a time.

Why not a torch DCT re-implementation (the reference's DiffJPEG)?  The pipeline runs under no_grad, so
differentiability buys nothing; DiffJPEG is the part that makes the reference CUDA-only; and the artefacts a
synthetic test set should imitate are those of the real codec (IJG quantisation tables scaled by quality,
4:2:0 chroma subsampling, libjpeg's rounding), which libjpeg produces by definition.  The cost is a host
round trip per image on CUDA, small next to the rest (JPEG runs at stage size, not HR size), and an integer
quality where DiffJPEG accepts a float.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode a 3×H×W RGB image in [0, 1] as JPEG at `quality` (1..100) and decode it again."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    bgr = np.ascontiguousarray(pixels.transpose(1, 2, 0)[:, :, ::-1])
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not JPEG-encode a {bgr.shape[1]}x{bgr.shape[0]} image")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)[:, :, ::-1].transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(decoded)).to(image.device, image.dtype) / 255
