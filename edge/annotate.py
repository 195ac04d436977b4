"""Draw a record's boxes on its frame (for snapshots, live views and the labels page)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import cv2
import numpy as np

from edgelabel.edge.config import LineConfig, ZoneConfig
from edgelabel.edge.records import DetectionRecord

ZONE_COLOR = (0, 200, 255)  # BGR amber: counted zones and lines
IGNORE_COLOR = (160, 160, 160)  # grey: ignore zones


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, well-separated BGR colour per class id (golden-ratio hue steps)."""
    hue = int((class_id * 0.618033988749895 % 1.0) * 179)
    hsv = np.uint8([[[hue, 200, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(image: np.ndarray, detections: Sequence[DetectionRecord], copy: bool = True) -> np.ndarray:
    """The image with each detection's box, label, score and track id drawn on it."""
    out = image.copy() if copy else image
    h, w = out.shape[:2]
    thickness = max(1, round(min(h, w) / 400))
    font_scale = max(0.4, min(h, w) / 1200)
    for det in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in det.box)
        color = class_color(det.class_id)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        text = f"{det.label} {det.score:.2f}"
        if det.track_id is not None:
            text += f" #{det.track_id}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else min(y1 + th + base + 2, h - 1)
        cv2.rectangle(out, (x1, ty - th - base), (x1 + tw + 2, ty + 1), color, -1)
        cv2.putText(out, text, (x1 + 1, ty - base + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                    thickness, cv2.LINE_AA)
    return out


def draw_zones(image: np.ndarray, zones: Mapping[str, ZoneConfig], lines: Mapping[str, LineConfig],
               scale: float = 1.0) -> np.ndarray:
    """The source's zones (outlined, named; ignore zones grey) and lines (with an arrow to the ``left`` side
    of a crossing) drawn on ``image`` in place, so the operator sees what is counted.

    ``scale`` maps pixel-unit points onto ``image`` when it was shrunk from the original frame;
    normalized points follow the image's own size.
    """
    h, w = image.shape[:2]
    thickness = max(1, round(min(h, w) / 400))
    font_scale = max(0.4, min(h, w) / 1200)

    def pixels(points: list[list[float]], units: str) -> np.ndarray:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        arr = arr * np.array([w, h]) if units == "normalized" else arr * scale
        return np.round(arr).astype(np.int32)

    def name_at(text: str, at: np.ndarray, color: tuple[int, int, int]) -> None:
        x, y = int(np.clip(at[0], 0, w - 1)), int(np.clip(at[1], 12, h - 1))
        cv2.putText(image, text, (x + 3, y - 3), cv2.FONT_HERSHEY_SIMPLEX, font_scale, color, thickness, cv2.LINE_AA)

    for name, zone in zones.items():
        pts = pixels(zone.points, zone.units)
        color = IGNORE_COLOR if zone.ignore else ZONE_COLOR
        cv2.polylines(image, [pts], True, color, thickness, cv2.LINE_AA)
        name_at(f"{name} (ignored)" if zone.ignore else name, pts[0], color)
    for name, line in lines.items():
        a, b = pixels(line.points, line.units)
        cv2.line(image, tuple(int(v) for v in a), tuple(int(v) for v in b), ZONE_COLOR, thickness + 1, cv2.LINE_AA)
        mid = (a + b) / 2
        d = (b - a).astype(np.float64)
        left = np.array([d[1], -d[0]]) / max(float(np.hypot(*d)), 1e-9)  # the "left" side, as displayed
        tip = mid + left * max(12.0, min(h, w) / 20)
        cv2.arrowedLine(image, tuple(int(v) for v in mid), tuple(int(v) for v in tip), ZONE_COLOR, thickness,
                        cv2.LINE_AA, tipLength=0.3)
        name_at(name, a, ZONE_COLOR)
    return image


def encode_jpeg(image: np.ndarray, quality: int = 80, max_width: int = 0) -> bytes:
    """JPEG bytes of the image, downscaled to ``max_width`` when it is wider (0 = keep size)."""
    if max_width and image.shape[1] > max_width:
        scale = max_width / image.shape[1]
        image = cv2.resize(image, (max_width, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()
