"""Letterbox preprocessing shared by every model family.

Families differ only in the values of a :class:`PreprocessSpec` (centred or
top-left padding, pad colour, channel order, scale), so one function serves
them all.  The numbers must match what each family saw in training exactly:
a one-pixel offset in the padding or a different rounding of the resized size
shifts every box and changes scores, which is why the rounding rules below
follow the reference implementations rather than being "simplified".
"""

from __future__ import annotations

import cv2
import numpy as np

from edgelabel.engines.models.base import LetterboxInfo, PreprocessSpec

# BGR (OpenCV) source channel for each output channel
_RGB_ORDER = (2, 1, 0)
_BGR_ORDER = (0, 1, 2)


def to_bgr(image: np.ndarray) -> np.ndarray:
    """Return a 3-channel BGR uint8 view/copy of a grey, BGR or BGRA frame.

    Sources hand us whatever the camera produces (mono industrial cameras,
    PNGs with alpha); converting here keeps every decoder on one input format.
    """
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {image.shape}")
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")


def letterbox(
    image_bgr: np.ndarray,
    size: tuple[int, int],
    spec: PreprocessSpec,
    dtype: type[np.floating] | np.dtype = np.float32,
) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize keeping the aspect ratio, pad to ``size`` (h, w) and lay out as NCHW.

    Returns a C-contiguous ``(1, 3, h, w)`` array of ``dtype`` and the
    :class:`LetterboxInfo` needed to map boxes back to the frame.

    * ``spec.center=True`` (Ultralytics/YOLOv5): the resized size is
      ``round(W*r), round(H*r)`` and the padding is split with
      ``top = round(dh - 0.1)`` so odd padding goes to the bottom/right.
    * ``spec.center=False`` (YOLOX ``preproc``): the resized size is
      ``int(W*r), int(H*r)`` and the image sits in the top-left corner.

    The output is written straight into one preallocated array (pad value
    first, then each channel converted and scaled in place), which avoids the
    padded uint8 copy and is several times faster than ``cv2.dnn.blobFromImage``
    on the CPUs this runs on.
    """
    image = to_bgr(image_bgr)
    out_h, out_w = int(size[0]), int(size[1])
    src_h, src_w = image.shape[:2]
    if src_h == 0 or src_w == 0:
        raise ValueError("cannot letterbox an empty image")
    ratio = min(out_h / src_h, out_w / src_w)

    if spec.center:
        new_w, new_h = int(round(src_w * ratio)), int(round(src_h * ratio))
    else:
        new_w, new_h = int(src_w * ratio), int(src_h * ratio)
    new_w, new_h = max(1, min(new_w, out_w)), max(1, min(new_h, out_h))

    if (new_w, new_h) != (src_w, src_h):
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    else:
        resized = image

    if spec.center:
        dw, dh = (out_w - new_w) / 2.0, (out_h - new_h) / 2.0
        left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    else:
        left, top = 0, 0

    out_dtype = np.dtype(dtype)
    tensor = np.empty((1, 3, out_h, out_w), dtype=out_dtype)
    # x / 255 and x * (1/255) differ by one ulp for about a fifth of the pixel values; models that
    # quantize their input on the fly (dynamic INT8) amplify that into score differences of several
    # hundredths, so scale like the reference implementations: divide by 255 when that is what 1/scale is
    divisor = round(1.0 / spec.scale) if spec.scale not in (0.0, 1.0) else 0
    exact_divisor = divisor > 0 and abs(1.0 / divisor - spec.scale) < 1e-12
    if new_w != out_w or new_h != out_h:
        if exact_divisor:
            tensor.fill(out_dtype.type(spec.pad_value) / out_dtype.type(divisor))
        else:
            tensor.fill(spec.pad_value * spec.scale)
    order = _RGB_ORDER if spec.rgb else _BGR_ORDER
    for dst, src in enumerate(order):
        region = tensor[0, dst, top : top + new_h, left : left + new_w]
        if spec.scale == 1.0:
            np.copyto(region, resized[:, :, src], casting="unsafe")
        elif exact_divisor:
            np.divide(resized[:, :, src], out_dtype.type(divisor), out=region, casting="unsafe")
        else:
            np.multiply(resized[:, :, src], out_dtype.type(spec.scale), out=region, casting="unsafe")

    info = LetterboxInfo(ratio=ratio, pad_x=float(left), pad_y=float(top), width=src_w, height=src_h)
    return tensor, info
