"""Image pixels in any form a user has them, as the RGB uint8 arrays the towers read: 16-bit and float levels
scaled (not clipped), grey repeated, transparency laid on white; any other array refused with its shape or range."""
from __future__ import annotations

import math

import numpy as np


def _pil_rgb(image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8: transparency on white, 16-bit and float levels scaled, not clipped."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":  # 16-bit grey: convert("RGB") would clip mid-grey to white
        pixels = np.asarray(image)
        return _as_uint8_rgb(pixels.clip(0, 65535).astype(np.uint16) if image.mode == "I" else pixels)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")  # paste on white: transparent pixels would otherwise turn black
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    return np.asarray(image.convert("RGB"))


def _as_uint8_rgb(pixels, what: str = "the image array") -> np.ndarray:
    """(H, W, 3) uint8 from an array: grey (H, W), RGB or RGBA (on white); uint8, uint16, or floats in [0, 1]."""
    pixels = np.asarray(pixels)
    pixels = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    if pixels.size == 0 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] in (3, 4))):
        hint = {4: "; a batch: pass a list of images"}.get(pixels.ndim, "; channels first? transpose to (H, W, 3)"
                                                          if pixels.ndim == 3 and pixels.shape[0] in (3, 4) else "")
        raise ValueError(f"{what} has shape {pixels.shape}: an image is (H, W), (H, W, 3) or (H, W, 4){hint}")
    if pixels.dtype == np.uint16:
        pixels = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 65535 -> 255, 32768 -> 128
    elif pixels.dtype.kind in "fiub" and pixels.dtype != np.uint8:
        low, high = (float(pixels.min()), float(pixels.max())) if pixels.dtype.kind != "b" else (0, 1)
        top = 1 if pixels.dtype.kind in "fb" else 255  # floats are [0, 1], as matplotlib.imread gives them
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low and high <= top):
            raise ValueError(f"{what} ({pixels.dtype}) has values from {low:g} to {high:g}: pass uint8 levels "
                             "0-255, uint16 levels, or floats in [0, 1] (as matplotlib.imread gives)")
        pixels = np.rint(pixels.astype(np.float32) * (255 / top)).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"{what} has dtype {pixels.dtype}: pass an array of numbers (uint8, uint16 or float)")
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.shape[2] == 4:  # transparent pixels on white, as load_image does
        alpha = pixels[..., 3:].astype(np.float32) / 255
        return np.rint(pixels[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(pixels)
