"""What a scene holds: car colours and kinds, the light styles, and the objects drawn.

Everything here is plain data; ``plan`` decides where objects go and ``render`` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from affine import Affine
from rasterio.crs import CRS

# Car body colours as seen from above (sRGB), with their share in a typical European car park.
CAR_COLOURS: list[tuple[str, float, tuple[int, int, int]]] = [
    ("white", 0.23, (222, 223, 220)),
    ("black", 0.16, (26, 27, 30)),
    ("grey", 0.15, (92, 95, 99)),
    ("silver", 0.14, (163, 166, 170)),
    # Anthracite and dark grey sit on the tones of worn and fresh asphalt.
    ("anthracite", 0.06, (58, 60, 64)),
    ("darkgrey", 0.04, (74, 76, 79)),
    ("blue", 0.07, (32, 58, 118)),
    ("red", 0.05, (148, 24, 26)),
    ("darkblue", 0.03, (24, 32, 62)),
    ("green", 0.02, (38, 78, 50)),
    ("beige", 0.02, (186, 172, 138)),
    ("brown", 0.01, (88, 58, 40)),
    ("yellow", 0.01, (212, 176, 38)),
    ("orange", 0.01, (200, 98, 30)),
]
# (kind, share, (length m range), (width m range), band layout from front (+1) to rear (-1)):
# hood end, windshield end, roof end, rear window end (fractions of the half length).
CAR_KINDS = [
    ("sedan", 0.45, (4.3, 4.9), (1.72, 1.86), (0.38, 0.06, -0.46, -0.66)),
    ("hatch", 0.25, (3.8, 4.3), (1.64, 1.78), (0.42, 0.12, -0.62, -0.86)),
    ("suv", 0.20, (4.4, 5.0), (1.82, 2.0), (0.50, 0.26, -0.80, -0.93)),
    ("van", 0.05, (4.8, 5.2), (1.88, 2.0), (0.62, 0.40, -0.90, -0.97)),
    ("pickup", 0.05, (4.9, 5.2), (1.85, 2.0), (0.42, 0.16, -0.22, -0.30)),
]
# Vehicles that are not cars (unlabelled distractors): (length m, width m, height m) ranges and
# roof colours. Long vans are as white as many cars; lorries and buses are longer than any car.
VEHICLES: dict[str, tuple[tuple[float, float], tuple[float, float], tuple[float, float],
                          list[tuple[int, int, int]]]] = {
    "longvan": ((5.9, 7.0), (2.0, 2.2), (2.5, 2.9),
                [(225, 226, 224), (225, 226, 224), (170, 172, 175), (40, 42, 46), (30, 60, 120)]),
    "truck": ((6.5, 10.0), (2.35, 2.55), (3.0, 3.8),
              [(230, 230, 228), (200, 202, 204), (150, 40, 30), (40, 80, 140)]),
    "bus": ((10.5, 12.0), (2.5, 2.55), (3.0, 3.3),
            [(215, 216, 214), (200, 40, 36), (230, 190, 40), (40, 90, 160)]),
}


@dataclass(frozen=True)
class Style:
    """Light and camera of a flight: ranges each scene draws from (same draws for every style).

    ``default`` is the sample as it always was (byte-identical for a given seed); the others
    exist to measure generalisation: train on one style, evaluate on another.
    """

    sun_elevation_deg: tuple[float, float] = (30, 62)
    shadow_light: tuple[float, float] = (0.35, 0.55)  # light left in shadow
    haze: tuple[float, float] = (0, 18)  # digital numbers of veil
    gain: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)  # mean per-band gain
    gamma: tuple[float, float] = (0.85, 1.15)
    noise: tuple[float, float] = (1.5, 3.5)  # sensor noise sigma, digital numbers
    blur_px: float = 0.55  # optics blur sigma


STYLES: dict[str, Style] = {
    "default": Style(),
    # Overcast: high diffuse light, weak short shadows, flat and bluish.
    "overcast": Style(sun_elevation_deg=(55, 75), shadow_light=(0.7, 0.85), haze=(10, 30),
                      gain=(0.85, 1.05), contrast=(0.7, 0.9), white_balance=(0.95, 1.0, 1.08),
                      noise=(2.0, 4.0)),
    # Evening: low sun, long dark shadows, warm light, darker exposure.
    "evening": Style(sun_elevation_deg=(15, 28), shadow_light=(0.25, 0.4), haze=(5, 25),
                     gain=(0.7, 0.95), contrast=(0.9, 1.2), white_balance=(1.12, 1.0, 0.82),
                     gamma=(0.9, 1.2)),
    # Faded: an older, softer camera with heavy haze and more noise.
    "faded": Style(haze=(20, 40), contrast=(0.65, 0.85), white_balance=(1.03, 1.03, 0.95),
                   noise=(3.0, 6.0), blur_px=0.9),
}


@dataclass
class Car:
    """One car in pixel coordinates of its scene (x = column, y = row, continuous)."""

    cx: float
    cy: float
    length_m: float
    width_m: float
    heading: float  # radians in the pixel frame: the front points to (cos, sin) in (x, y)
    colour: str = "grey"
    kind: str = "sedan"
    rgb: tuple[float, float, float] = (128.0, 128.0, 128.0)
    under_tree: float = 0.0  # share of the footprint under tree crowns (at most 0.4)
    in_shadow: float = 0.0  # mean shadow (of buildings and trees) over the footprint, 0-1
    in_scene: float = 1.0  # share of the footprint on the scene's valid pixels

    def corners(self, gsd: float) -> np.ndarray:
        """The footprint rectangle's 4 corners as (x, y) pixel coordinates."""
        hl, hw = self.length_m / 2 / gsd, self.width_m / 2 / gsd
        c, s = math.cos(self.heading), math.sin(self.heading)
        local = np.array([[hl, hw], [hl, -hw], [-hl, -hw], [-hl, hw]])
        return np.stack([self.cx + local[:, 0] * c - local[:, 1] * s,
                         self.cy + local[:, 0] * s + local[:, 1] * c], axis=1)


@dataclass
class Box:
    """A car-like object that is not a car: container, rooftop unit, dumpster, road patch, or a
    vehicle that is no car (long van, lorry, bus)."""

    cx: float
    cy: float
    length_m: float
    width_m: float
    heading: float
    kind: str
    rgb: tuple[float, float, float]
    height_m: float = 2.5


@dataclass
class SceneRender:
    """A rendered scene: the image, where it is valid, the cars and the car pixels drawn."""

    image: np.ndarray  # (3, rows, cols) uint8, 0 only where invalid
    valid: np.ndarray  # (rows, cols) bool
    cars: list[Car]
    car_mask: np.ndarray  # (rows, cols) bool: body coverage >= 0.5 as drawn (before trees)
    transform: Affine
    crs: CRS
    gsd: float
    sun_azimuth_deg: float
    boxes: list[Box] = field(default_factory=list)
    sparse: bool = False

    def car_fraction(self) -> float:
        """Share of the valid pixels that are car (as drawn, before trees)."""
        return float(self.car_mask.sum() / max(int(self.valid.sum()), 1))

    def footprints(self) -> list:
        """The cars' rectangles as shapely polygons in the scene CRS."""
        from shapely.geometry import Polygon

        polys = []
        for car in self.cars:
            xy = car.corners(self.gsd)
            t = self.transform
            xs, ys = t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f
            polys.append(Polygon(np.stack([xs, ys], axis=1)))
        return polys

