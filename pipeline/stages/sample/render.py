"""Drawing a scene: ground, buildings and their shadows, cars, non-car objects, trees, camera.

Everything is drawn in a local street frame rotated by a random angle per scene, so cars and
markings appear at any heading; cars and trees are drawn per patch with anti-aliased
signed-distance shapes at 2x supersampling, never over the whole scene.
"""

from __future__ import annotations

import math

import numpy as np
from affine import Affine
from rasterio import features
from rasterio.crs import CRS
from scipy import ndimage

from pipeline.stages.sample.objects import CAR_KINDS, STYLES, VEHICLES, Box, Car, SceneRender, Style
from pipeline.stages.sample.plan import _Frame, _Layout, _place_cars, _plan, footprint_mean
from pipeline.stages.sample.shapes import (
    SS,
    _band,
    _box_sdf,
    _coverage,
    _fbm,
    _patch,
    _pool,
    _ss_grid,
)


def _ground(rng, lay: _Layout, fr: _Frame, shape, valid) -> tuple[np.ndarray, np.ndarray]:
    """Ground colours (3, rows, cols) float32 and a height map of buildings for shadows."""
    rows, cols = shape
    g = fr.gsd
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    dx, dy = (xx + 0.5 - fr.cx) * g, (yy + 0.5 - fr.cy) * g
    c, s = math.cos(fr.theta), math.sin(fr.theta)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    del xx, yy, dx, dy

    edges = np.array([b[1] for b in lay.bands[1:]], np.float32)
    band_id = np.searchsorted(edges, v, side="right")
    kinds = [b[0] for b in lay.bands]
    base = np.zeros((len(kinds), 3), np.float32)
    amp = np.zeros(len(kinds), np.float32)
    for i, (kind, _v0, _v1, p) in enumerate(lay.bands):
        if kind in ("road", "lot"):
            tone = rng.uniform(48, 62) if p.get("dark") else rng.uniform(88, 122)
            base[i] = tone * np.array([1.0, 1.0, 1.02]) + rng.normal(0, 2, 3)
            amp[i] = rng.uniform(5, 9)
        elif kind == "sidewalk":
            base[i] = rng.uniform(150, 185) * np.array([1.0, 0.99, 0.95])
            amp[i] = 6
        elif kind == "building":
            base[i] = (rng.uniform(70, 100), rng.uniform(95, 125), rng.uniform(45, 65))
            amp[i] = 12
        else:
            dry = rng.uniform(0, 1)
            base[i] = np.array([70, 105, 48]) * (1 - dry) + np.array([130, 128, 80]) * dry
            amp[i] = 12
    img = base[band_id].transpose(2, 0, 1).copy()  # (3, rows, cols)
    ftype = np.array([k in ("road", "lot") for k in kinds])[band_id]
    grass = np.array([k in ("grass", "building") for k in kinds])[band_id]

    # Texture: coarse mottling, medium patches and per-pixel aggregate grain.
    px = 1 / g
    n = _fbm(rng, shape, [40 * px, 8 * px, 1.5 * px, 1.0], [0.6, 0.5, 0.4, 0.6])
    img += (amp[band_id] * n)[None]
    # Grass colour varies between green and straw, not just in brightness.
    hue = _fbm(rng, shape, [12 * px, 3 * px], [0.7, 0.5])
    img[0] += np.where(grass, 10 * hue, 0)
    img[2] -= np.where(grass, 4 * hue, 0)

    soft = g
    paint = np.zeros(shape, np.float32)
    for kind, v0, v1, p in lay.bands:
        inb = (v >= v0) & (v < v1)
        if not inb.any():
            continue
        if kind == "road":
            # Lanes start after the parking lane on the low side (if any); edge lines and
            # centre dashes between the lanes, none across the kerbside parking.
            lw, l0 = p["lane_w"], v0 + p["lane_v0"]
            for k in range(1, p["lanes"]):
                dash = (np.mod(u, 9.0) < 3.0) if k == p["lanes"] // 2 else (np.mod(u, 6.0) < 1.5)
                paint = np.maximum(paint, inb * dash * _band(v, l0 + k * lw - 0.08,
                                                             l0 + k * lw + 0.08, soft))
            edge = _band(v, l0 + 0.05, l0 + 0.20, soft)
            edge += _band(v, l0 + p["lanes"] * lw - 0.15, l0 + p["lanes"] * lw, soft)
            paint = np.maximum(paint, inb * np.clip(edge, 0, 1))
            # Tyre tracks darken the middle of each wheel path.
            for k in range(p["lanes"]):
                for off in (0.25, 0.75):
                    vt = l0 + (k + off) * lw
                    img *= 1 - 0.06 * (inb * np.exp(-((v - vt) / 0.35) ** 2))[None]
        elif kind == "sidewalk":
            joints = np.abs(np.mod(u, 1.8) - 0.9) > 0.86
            img *= 1 - 0.18 * (inb & joints)[None]
            curb = _band(v, v0, v0 + 0.2, soft) + _band(v, v1 - 0.2, v1, soft)
            img += (28 * inb * np.clip(curb, 0, 1))[None]
        elif kind == "lot":
            for r, (a, b) in enumerate(p["row_v"]):
                if r in p.get("unlined", []):
                    continue
                inrow = inb & (v >= a) & (v <= b)
                du = np.abs(np.mod(u - p["u_off"] + p["stall_w"] / 2, p["stall_w"])
                            - p["stall_w"] / 2)
                paint = np.maximum(paint, inrow * _coverage((du - 0.06) / soft))
            for r in range(0, len(p["row_v"]), 2):
                end = p["row_v"][r][1]
                paint = np.maximum(paint, inb * _band(v, end - 0.08, end + 0.06, soft) * 0.8)
    # Worn paint: the white shows through unevenly.
    wear = np.clip(0.75 + 0.35 * _fbm(rng, shape, [2 * px, 1.0], [0.7, 0.4]), 0.2, 1)
    paint *= wear
    paint_rgb = np.array([232, 232, 225], np.float32) if rng.random() < 0.8 else \
        np.array([225, 195, 60], np.float32)
    img = img * (1 - paint) + paint_rgb[:, None, None] * paint

    # Cracks (dark polylines) and oil stains on the asphalt.
    crack = np.zeros(shape, np.float32)
    from skimage.draw import line_aa

    for _ in range(int(rows * cols * g * g / 150)):
        y, x = rng.uniform(0, rows), rng.uniform(0, cols)
        ang = rng.uniform(0, 2 * math.pi)
        for _ in range(int(rng.integers(4, 16))):
            ang += rng.normal(0, 0.5)
            step = rng.uniform(2, 8)
            y2, x2 = y + step * math.sin(ang), x + step * math.cos(ang)
            rr, cc, val = line_aa(int(y), int(x), int(y2), int(x2))
            ok = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
            crack[rr[ok], cc[ok]] = np.maximum(crack[rr[ok], cc[ok]], val[ok])
            y, x = y2, x2
    img *= 1 - (0.22 * crack * ftype)[None]
    for us, vs in lay.stains:
        xs, ys = fr.to_px(us, vs)
        pb = _patch(xs, ys, 1.5 / g, shape)
        if pb is None:
            continue
        r0, r1, c0, c1 = pb
        yy, xx = np.mgrid[r0:r1, c0:c1]
        d2 = ((xx - xs) ** 2 + (yy - ys) ** 2) * g * g
        blob = np.exp(-d2 / rng.uniform(0.1, 0.4)) * rng.uniform(0.2, 0.45)
        img[:, r0:r1, c0:c1] *= 1 - blob * ftype[r0:r1, c0:c1]

    # Buildings: roofs, and a height map that casts their shadows.
    height = np.zeros(shape, np.float32)
    for u0, u1, a, b, roof, h in lay.buildings:
        inb = (u >= u0) & (u < u1) & (v >= a) & (v < b)
        if not inb.any():
            continue
        tex = {"gravel": (rng.uniform(120, 160), 10), "tar": (rng.uniform(55, 75), 5),
               "tile": (rng.uniform(120, 160), 8), "metal": (rng.uniform(170, 200), 4),
               "gable_grey": (rng.uniform(80, 110), 6)}[roof]
        col = np.array([1.0, 0.98, 0.95]) if roof != "tile" else np.array([1.0, 0.5, 0.36])
        shade = np.ones(shape, np.float32)
        if roof in ("tile", "gable_grey"):
            # Two roof planes: the one facing the sun is brighter; a ridge line between.
            side = np.sign(v - (a + b) / 2)
            shade = np.where(side > 0, 1.12, 0.82).astype(np.float32) if rng.random() < 0.5 \
                else np.where(side > 0, 0.82, 1.12).astype(np.float32)
            shade *= 1 - 0.25 * np.exp(-((v - (a + b) / 2) / 0.15) ** 2)
            stripes = 0.06 * np.sin(u * 2 * math.pi / 0.35)
            shade += stripes.astype(np.float32)
        elif roof == "metal":
            shade = (1 - 0.08 * (np.mod(u, 0.6) < 0.12)).astype(np.float32)
        idx = np.nonzero(inb)
        tone = tex[0] * shade[idx] + tex[1] * n[idx]
        img[:, idx[0], idx[1]] = (tone[None] * col[:, None]).astype(np.float32)
        # A parapet: a slightly lighter rim on flat roofs.
        if roof in ("gravel", "tar", "metal"):
            rim = inb & ~((u >= u0 + 0.3) & (u < u1 - 0.3) & (v >= a + 0.3) & (v < b - 0.3))
            img[:, rim] = np.minimum(img[:, rim] * 1.25 + 15, 250)
        height[inb] = h
    return img, height


def _building_shadow(lay: _Layout, frame: _Frame, shape: tuple[int, int],
                     per_m: tuple[float, float]) -> np.ndarray:
    """Shadow of each building: its footprint swept away from the sun by its height (0/1)."""
    from shapely.geometry import MultiPoint

    shapes = []
    for u0, u1, a, b, _roof, h in lay.buildings:
        corners = [frame.to_px(u, v) for u, v in ((u0, a), (u1, a), (u1, b), (u0, b))]
        moved = [(x + per_m[0] * h, y + per_m[1] * h) for x, y in corners]
        # A box swept along a straight line covers the convex hull of its start and end.
        shapes.append((MultiPoint(corners + moved).convex_hull, 1))
    if not shapes:
        return np.zeros(shape, np.float32)
    return features.rasterize(shapes, out_shape=shape, fill=0, dtype="uint8").astype(np.float32)


def _draw_car(img: np.ndarray, car_mask: np.ndarray, car: Car, gsd: float, rng,
              shadow_dir: tuple[float, float], shadow_len_m: float, sun_px: tuple[float, float],
              shadow_dark: float) -> None:
    """Draw one car (contact shadow, cast shadow, body, glass, highlights) into its patch."""
    kind = next(k for k in CAR_KINDS if k[0] == car.kind)
    hood, ws, roof_end, rear = kind[4]
    hl, hw = car.length_m / 2 / gsd, car.width_m / 2 / gsd
    sh = shadow_len_m / gsd
    pb = _patch(car.cx, car.cy, math.hypot(hl, hw) + sh + 3, car_mask.shape)
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1)
    ch, sn = math.cos(car.heading), math.sin(car.heading)

    def local(ox: float = 0.0, oy: float = 0.0):
        dx, dy = X - car.cx - ox, Y - car.cy - oy
        return dx * ch + dy * sn, -dx * sn + dy * ch

    s, t = local()
    radius = min(0.45 / gsd, hw * 0.6)
    body_sdf = _box_sdf(s, t, hl, hw, radius)
    # Cast shadow: the body swept away from the sun, soft-edged; plus a dark contact rim.
    sdf_sh = body_sdf.copy()
    for f in (0.35, 0.7, 1.0):
        ss_, st_ = local(shadow_dir[0] * sh * f, shadow_dir[1] * sh * f)
        sdf_sh = np.minimum(sdf_sh, _box_sdf(ss_, st_, hl * 0.97, hw * 0.95, radius * 1.5))
    shadow = _coverage(sdf_sh * SS, soft=2.0 * SS) * (1 - shadow_dark)
    contact = 0.35 * np.exp(-np.maximum(body_sdf, 0) / 1.2)
    ground_mul = _pool(np.maximum(shadow, contact * (body_sdf > 0)))

    sn_ = s / hl
    tn = t / hw
    base = np.array(car.rgb, np.float32)
    dark_car = base.mean() < 60
    # Body: rounded across its width (sides fall off), hood and boot slightly darker than roof.
    curve = 1 - 0.28 * np.abs(tn) ** 4
    body = base[:, None, None] * curve[None]
    cabin = _band(sn_, rear - 0.02, hood + 0.02, 0.05) * _band(tn, -0.84, 0.84, 0.06)
    glass_w = 0.80 - 0.12 * np.clip((hood - sn_) / max(hood - ws, 1e-3), 0, 1)
    windshield = _band(sn_, ws, hood, 0.04) * (np.abs(tn) < glass_w)
    rear_win = _band(sn_, rear, roof_end, 0.04) * (np.abs(tn) < 0.76)
    side_win = _band(sn_, roof_end, ws, 0.03) * _band(np.abs(tn), 0.62, 0.84, 0.05)
    glass_rgb = np.array([38, 42, 50], np.float32) * rng.uniform(0.8, 1.25)
    # Sky reflected in the windshield: lighter towards the front edge.
    sky = 30 * np.clip((sn_ - ws) / max(hood - ws, 1e-3), 0, 1)
    glass = glass_rgb[:, None, None] + sky[None]
    g_alpha = np.clip(windshield + rear_win + 0.8 * side_win, 0, 1) * cabin
    body = body * (1 - g_alpha[None]) + glass * g_alpha[None]
    roof = _band(sn_, roof_end, ws, 0.03) * _band(tn, -0.62, 0.62, 0.05)
    body *= (1 + (0.06 if not dark_car else 0.15) * roof)[None]
    # Tail lights at the rear corners; a black roof on some small cars.
    tail = _band(sn_, -1.0, -0.93, 0.02) * _band(np.abs(tn), 0.55, 0.92, 0.05)
    body = body * (1 - 0.6 * tail)[None] + (tail * 0.6)[None] * \
        np.array([150, 20, 20], np.float32)[:, None, None]
    if car.kind == "hatch" and not dark_car and rng.random() < 0.2:
        body = body * (1 - 0.8 * roof)[None] + (roof * 0.8 * 30)[None]
    if car.kind == "pickup":
        bed = _band(sn_, -0.95, rear - 0.04, 0.03) * _band(tn, -0.8, 0.8, 0.05)
        body = body * (1 - 0.55 * bed)[None]
    if rng.random() < 0.15 and car.kind in ("sedan", "suv"):
        sunroof = _band(sn_, (roof_end + ws) / 2 - 0.05, ws - 0.05, 0.03) * (np.abs(tn) < 0.4)
        body = body * (1 - sunroof[None]) + glass * sunroof[None]
    # Specular highlight on the roof and hood on the side facing the sun.
    hx, hy = sun_px
    for centre, amp in ((((roof_end + ws) / 2) * hl, 1.0), (((hood + 1) / 2) * hl, 0.6)):
        d2 = (s - centre - (hx * ch + hy * sn) * hw * 0.4) ** 2 + \
             (t - (-hx * sn + hy * ch) * hw * 0.4) ** 2
        spec = amp * np.exp(-d2 / (2 * (0.25 * hw) ** 2)) * (1 - 0.6 * g_alpha)
        body += (spec * (40 if dark_car else 0.3 * (255 - base.mean()) + 10))[None]
    # A thin dark outline where the body meets the ground (bumpers, side skirts).
    body *= (1 - 0.25 * _band(body_sdf, -1.0 * SS / SS, 0.5, 0.5))[None]
    alpha = _coverage(body_sdf * SS, soft=1.0)

    patch = img[:, r0:r1, c0:c1]
    patch *= 1 - ground_mul[None] * np.array([1.0, 0.98, 0.92], np.float32)[:, None, None]
    a = _pool(alpha)
    col = _pool(body * alpha[None]) / np.maximum(a, 1e-6)[None]
    patch[:] = patch * (1 - a[None]) + col * a[None]
    car_mask[r0:r1, c0:c1] |= a >= 0.5


def _vehicle_roof(col: np.ndarray, box: Box, s, t, hl: float, hw: float, gsd: float,
                  rng) -> np.ndarray:
    """Roof of a long van, lorry or bus seen from above (front at +s): glass, cab, roof units.

    They share a car's colours and glass, so only their size and roof layout tell them apart.
    """
    sm = s * gsd  # metres along the vehicle, 0 at its centre
    front = box.length_m / 2 - sm  # metres behind the front bumper
    glass = np.array([38, 42, 50], np.float32)[:, None, None] * rng.uniform(0.8, 1.2)
    col *= (1 - 0.22 * np.abs(t / hw) ** 4)[None]  # the roof's edges fall off
    if box.kind == "longvan":
        ws = _band(front, 0.5, 1.2, 0.05) * (np.abs(t / hw) < 0.85)
        col *= (1 - 0.12 * (np.mod(sm, 0.55) < 0.07) * (front > 1.3))[None]  # roof ribs
        col = col * (1 - ws[None]) + glass * ws[None]
    elif box.kind == "truck":
        cab = float(rng.uniform(1.9, 2.4))
        cab_rgb = np.array(rng.choice([(225, 226, 224), (150, 30, 30), (40, 70, 130),
                                       (60, 62, 66)]), np.float32)[:, None, None]
        in_cab = _band(front, 0.0, cab, 0.05)
        col = col * (1 - in_cab[None]) + cab_rgb * (1 - 0.2 * np.abs(t / hw) ** 4)[None] \
            * in_cab[None]
        ws = _band(front, 0.05, 0.35, 0.05) * (np.abs(t / hw) < 0.85)
        col = col * (1 - ws[None]) + glass * ws[None]
        gap = _band(front, cab, cab + 0.25, 0.03)  # the dark gap between cab and load box
        col *= (1 - 0.7 * gap)[None]
        col *= (1 - 0.1 * _band(np.abs(t / hw), 0.9, 1.0, 0.03))[None]
    else:  # bus: air conditioning units and hatches on the roof, a deep windscreen
        ws = _band(front, 0.0, 0.45, 0.05) * (np.abs(t / hw) < 0.88)
        col = col * (1 - ws[None]) + glass * ws[None]
        for centre, length in ((box.length_m * rng.uniform(0.25, 0.4), 2.6),
                               (box.length_m * rng.uniform(0.6, 0.8), 1.0)):
            unit = _band(front, centre - length / 2, centre + length / 2, 0.04) * \
                (np.abs(t * gsd) < 0.8)
            col = col * (1 - unit[None]) + (0.85 * col + 40) * unit[None]
    return col


def _draw_box(img: np.ndarray, box: Box, gsd: float, shadow_dir, per_m: float,
              shadow_dark: float, rng) -> None:
    """Draw a non-car object: container, rooftop unit, dumpster, road patch or long vehicle."""
    hl, hw = box.length_m / 2 / gsd, box.width_m / 2 / gsd
    sh = 0 if box.kind == "patch" else per_m * box.height_m
    pb = _patch(box.cx, box.cy, math.hypot(hl, hw) + sh + 3, img.shape[1:])
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1)
    ch, sn = math.cos(box.heading), math.sin(box.heading)
    dx, dy = X - box.cx, Y - box.cy
    s, t = dx * ch + dy * sn, -dx * sn + dy * ch
    sdf = _box_sdf(s, t, hl, hw, 0.1 / gsd)
    base = np.array(box.rgb, np.float32)
    col = np.broadcast_to(base[:, None, None], (3,) + s.shape).copy()
    if box.kind == "container":
        col *= (1 - 0.18 * (np.mod(s * gsd, 0.28) < 0.1))[None]  # corrugated walls
        col *= (1 - 0.3 * _band(np.abs(s), hl - 0.12 / gsd, hl, 0.5))[None]
    elif box.kind == "hvac":
        fan = np.hypot(s - hl * 0.4, t) < hw * 0.6
        col *= (1 - 0.55 * fan)[None]
        col *= (1 - 0.15 * (np.mod(s * gsd, 0.2) < 0.05) * ~fan)[None]
    elif box.kind == "dumpster":
        col *= (1 - 0.3 * (np.abs(s) < 0.06 / gsd))[None]
    elif box.kind == "patch":
        col += 6 * rng.standard_normal(s.shape)[None]
    elif box.kind in VEHICLES:
        col = _vehicle_roof(col, box, s, t, hl, hw, gsd, rng)
    patch = img[:, r0:r1, c0:c1]
    if sh > 0:
        sdf_sh = sdf.copy()
        for f in (0.33, 0.66, 1.0):
            dxs, dys = dx - shadow_dir[0] * sh * f, dy - shadow_dir[1] * sh * f
            sdf_sh = np.minimum(sdf_sh, _box_sdf(dxs * ch + dys * sn, -dxs * sn + dys * ch,
                                                 hl, hw, 0.1 / gsd))
        shadow = _pool(_coverage(sdf_sh * SS, soft=1.5 * SS) * (1 - shadow_dark))
        patch *= 1 - shadow[None]
    alpha = _coverage(sdf * SS, soft=1.0) * (0.8 if box.kind == "patch" else 1.0)
    a = _pool(alpha)
    c = _pool(col * alpha[None]) / np.maximum(a, 1e-6)[None]
    patch[:] = patch * (1 - a[None]) + c * a[None]


def _tree_params(rng) -> tuple:
    """A tree's height, crown lobes and leaf colour (drawn once; the crown is drawn twice)."""
    h = rng.uniform(5, 12)
    k = int(rng.integers(3, 7))
    ph = rng.uniform(0, 2 * math.pi, 3)
    base = np.array([rng.uniform(38, 68), rng.uniform(62, 92), rng.uniform(28, 44)], np.float32)
    return h, k, ph, base


def _draw_tree(img: np.ndarray, shade: np.ndarray, cx: float, cy: float, r_m: float,
               gsd: float, params: tuple, shadow_dir, per_m: float, sun_px, cover: np.ndarray,
               leaf_tex: np.ndarray) -> None:
    """A lobed tree crown with leafy texture, lit from the sun, and its shadow on the ground.

    Crowns are soft-edged anyway, so they are drawn at pixel resolution (no supersampling), with
    their leaf texture cut from one scene-wide noise field.
    """
    r = r_m / gsd
    h, k, ph, base = params
    sh = per_m * h
    pb = _patch(cx + shadow_dir[0] * sh / 2, cy + shadow_dir[1] * sh / 2, r * 1.3 + sh / 2 + 3,
                img.shape[1:])
    if pb is None:
        return
    r0, r1, c0, c1 = pb
    X, Y = _ss_grid(r0, r1, c0, c1, ss=1)

    def crown(ox: float, oy: float) -> np.ndarray:
        dx, dy = X - cx - ox, Y - cy - oy
        ang = np.arctan2(dy, dx)
        rr = r * (1 + 0.12 * np.sin(k * ang + ph[0]) + 0.07 * np.sin((k + 3) * ang + ph[1]))
        return np.hypot(dx, dy) - rr

    sdf = crown(0, 0)
    sdf_sh = crown(shadow_dir[0] * sh, shadow_dir[1] * sh)
    shadow = _coverage(sdf_sh, soft=3.0)
    shade[r0:r1, c0:c1] = np.maximum(shade[r0:r1, c0:c1], shadow * 0.85)
    leaf = leaf_tex[r0:r1, c0:c1]
    # Leafy clumps: bright tops on the sunny side, dark gaps between; the rim is ragged.
    dx, dy = (X - cx) / r, (Y - cy) / r
    rho2 = np.clip(dx**2 + dy**2, 0, 1)
    light = 0.9 + 0.3 * (dx * sun_px[0] + dy * sun_px[1]) - 0.25 * rho2
    col = base[:, None, None] * np.clip(light + 0.3 * leaf, 0.35, 1.8)[None]
    alpha = _coverage(sdf + 1.2 * r * 0.08 * leaf, soft=1.5)
    # Thin foliage at the rim lets a car show through a little.
    alpha *= np.clip(1.05 + 0.25 * leaf - 0.5 * np.clip(rho2 - 0.75, 0, 1), 0, 1)
    img[:, r0:r1, c0:c1] = img[:, r0:r1, c0:c1] * (1 - alpha[None]) + col * alpha[None]
    cover[r0:r1, c0:c1] = np.maximum(cover[r0:r1, c0:c1], alpha)


def _collar(rng, shape: tuple[int, int]) -> np.ndarray:
    """Valid-data mask with an irregular mosaic border on two sides (True = valid)."""
    rows, cols = shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    edge = cols * rng.uniform(0.05, 0.15) + np.cumsum(rng.normal(0, 1.5, rows))
    # Mosaic seams run in straight runs with steps, not smooth curves.
    edge = ndimage.median_filter(edge, size=31, mode="nearest")
    valid = xx >= edge[:, None]
    diag = (xx / cols + (rows - yy) / rows) > rng.uniform(1.55, 1.75)
    return valid & ~diag


def _make_boxes(rng, lay: _Layout, frame: _Frame, width: int, height: int,
                gsd: float) -> list[Box]:
    """Sizes and colours of the planned non-car objects; a vehicle overlapping another goes."""
    from shapely.geometry import Polygon

    boxes: list[Box] = []
    for u, v, hdg, kind in lay.boxes:
        x, y = frame.to_px(u, v)
        if kind == "container":
            L, W, rgb, h = (rng.choice([6.06, 12.19]), 2.44,
                            tuple(rng.choice([(150, 40, 30), (30, 70, 130), (40, 100, 60),
                                              (120, 120, 118), (180, 110, 40)])), 2.6)
        elif kind == "hvac":
            L, W = rng.uniform(1.4, 3.2), rng.uniform(1.0, 2.0)
            rgb, h = (rng.uniform(165, 215),) * 3, rng.uniform(0.8, 1.6)
        elif kind == "dumpster":
            L, W, h = rng.uniform(1.6, 2.2), rng.uniform(1.0, 1.4), 1.3
            rgb = tuple(rng.choice([(40, 70, 50), (50, 55, 60), (40, 60, 110), (150, 110, 40)]))
        elif kind in VEHICLES:
            lr, wr, hr, colours = VEHICLES[kind]
            L, W, h = rng.uniform(*lr), rng.uniform(*wr), rng.uniform(*hr)
            rgb = tuple(np.clip(np.array(colours[int(rng.integers(len(colours)))], float)
                                * rng.normal(1, 0.05), 8, 250))
        else:
            L, W, h = rng.uniform(3.5, 5.5), rng.uniform(1.5, 2.6), 0.0
            rgb = (rng.uniform(40, 75),) * 3
        if 0 <= x < width and 0 <= y < height:
            boxes.append(Box(x, y, float(L), float(W), frame.theta + hdg, kind,
                             tuple(float(c) for c in rgb), h))
    def poly(b: Box):
        return Polygon(Car(b.cx, b.cy, b.length_m, b.width_m, b.heading).corners(gsd))

    taken = [poly(b) for b in boxes if b.kind != "patch" and b.kind not in VEHICLES]
    kept: list[Box] = []
    for box in boxes:
        if box.kind in VEHICLES:
            mine = poly(box)
            if any(mine.intersects(q) for q in taken):
                continue
            taken.append(mine)
        kept.append(box)
    return kept


def render_scene(rng: np.random.Generator, width: int, height: int, *, gsd: float,
                 transform: Affine, crs: CRS, collar: bool = False,
                 style: Style | str = "default", sparse: bool = False) -> SceneRender:
    """Draw one scene; the result keeps the car raster it drew, for checks against labels.

    Args:
        rng: the scene's random generator (the only source of randomness).
        width, height: scene size in pixels.
        gsd: pixel size in metres.
        transform, crs: the scene's grid.
        collar: give the scene an irregular nodata border.
        style: light and camera (a name in ``STYLES`` or a ``Style``).
        sparse: a residential street scene with cars on 1-3% of the valid pixels.
    """
    st = STYLES[style] if isinstance(style, str) else style
    shape = (height, width)
    frame = _Frame(theta=rng.uniform(0, math.pi), cx=width / 2, cy=height / 2, gsd=gsd)
    half = 0.5 * math.hypot(width, height) * gsd + 6
    lay = _plan(rng, half, sparse=sparse)
    valid = _collar(rng, shape) if collar else np.ones(shape, bool)

    # One sun per scene: azimuth (from north, clockwise) and elevation set every shadow.
    azimuth = rng.uniform(0, 360)
    elevation = math.radians(rng.uniform(*st.sun_elevation_deg))
    sun_px = (math.sin(math.radians(azimuth)), -math.cos(math.radians(azimuth)))
    shadow_dir = (-sun_px[0], -sun_px[1])
    per_m = 1 / math.tan(elevation) / gsd  # shadow pixels per metre of height
    shadow_dark = rng.uniform(*st.shadow_light)  # light left in shadow

    img, heights = _ground(rng, lay, frame, shape, valid)
    building = heights > 0
    shade = _building_shadow(lay, frame, shape, (shadow_dir[0] * per_m, shadow_dir[1] * per_m))

    # Distractors first (they stand on the ground like cars do).
    boxes = _make_boxes(rng, lay, frame, width, height, gsd)
    # Road patches are painted before everything else stands on them.
    for box in sorted(boxes, key=lambda b: b.kind != "patch"):
        _draw_box(img, box, gsd, shadow_dir, per_m, shadow_dark, rng)

    # Tree crowns are known before cars are placed, so no car is more than partly hidden.
    leaf_tex = _fbm(rng, shape, [0.7 / gsd, 0.3 / gsd, 1.0], [0.6, 0.5, 0.3])
    trees = [(*frame.to_px(u, v), r, _tree_params(rng)) for u, v, r in lay.trees]
    cover = np.zeros(shape, np.float32)
    scratch, scratch_shade = np.zeros((3, *shape), np.float32), np.zeros(shape, np.float32)
    for x, y, r, params in trees:
        _draw_tree(scratch, scratch_shade, x, y, r, gsd, params, shadow_dir, per_m, sun_px, cover,
                   leaf_tex)
    del scratch, scratch_shade
    target = rng.uniform(0.012, 0.026) if sparse else None
    cars = _place_cars(rng, lay, frame, gsd, shape, valid, building, boxes, cover, target)
    car_mask = np.zeros(shape, bool)
    for car in cars:
        _draw_car(img, car_mask, car, gsd, rng, shadow_dir, 1.45 / math.tan(elevation),
                  sun_px, shadow_dark)

    # Trees over cars and ground, their shadows with the buildings'.
    cover = np.zeros(shape, np.float32)
    tree_img = img.copy()
    for x, y, r, params in trees:
        _draw_tree(tree_img, shade, x, y, r, gsd, params, shadow_dir, per_m, sun_px, cover,
                   leaf_tex)
    shade = ndimage.gaussian_filter(shade, 1.2)
    shade = np.where(building, 0, shade)
    # Shadows are lit by the blue sky only: darker and bluer.
    tint = np.array([1.0, 0.97, 0.88], np.float32)[:, None, None]
    mul = 1 - shade[None] * (1 - shadow_dark) * tint
    img = img * mul
    # Tree crowns sit above the shadows cast on the ground (their own shading is in the texture).
    img = _composite_trees(img, tree_img, cover, mul)
    for car in cars:
        car.under_tree = footprint_mean(car, cover, gsd)
        car.in_shadow = footprint_mean(car, shade * (1 - cover), gsd)

    # Camera: optics blur, chroma at lower resolution than luma (as in JPEG-compressed
    # orthophoto deliveries), haze, per-scene exposure, contrast, white balance, sensor noise.
    img = ndimage.gaussian_filter(img, (0, st.blur_px, st.blur_px))
    luma = 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    chroma = ndimage.gaussian_filter(img - luma[None], (0, 1.0, 1.0))
    img = luma[None] + chroma
    if rng.random() < 0.5:
        # A mosaic seamline: the two source photos differ a little in exposure and colour.
        yy, xx = np.mgrid[0:height, 0:width]
        ang = rng.uniform(0, math.pi)
        side = (xx - width * rng.uniform(0.3, 0.7)) * math.cos(ang) + \
            (yy - height * rng.uniform(0.3, 0.7)) * math.sin(ang) > 0
        step = (rng.normal(1, 0.03) * rng.normal(1, 0.015, 3)).astype(np.float32)
        img = np.where(side[None], img * step[:, None, None], img)
    haze = rng.uniform(*st.haze)
    img = img * (1 - haze / 255) + haze * np.array([0.9, 0.97, 1.1], np.float32)[:, None, None]
    gain = rng.uniform(*st.gain)
    contrast = rng.uniform(*st.contrast)
    wb = rng.normal(1, 0.03, 3) * np.asarray(st.white_balance)
    wb = wb.astype(np.float32)[:, None, None]
    mean = float(img.mean())
    img = ((img - mean) * contrast + mean) * gain * wb
    img = 255 * np.clip(img / 255, 0, None) ** rng.uniform(*st.gamma)
    img += rng.normal(0, rng.uniform(*st.noise), img.shape).astype(np.float32)
    out = np.clip(np.rint(img), 1, 255).astype(np.uint8)  # 0 is reserved for nodata
    out[:, ~valid] = 0
    return SceneRender(out, valid, cars, car_mask & valid, transform, crs, gsd, azimuth, boxes,
                       sparse)


def _composite_trees(img: np.ndarray, tree_img: np.ndarray, cover: np.ndarray,
                     mul: np.ndarray) -> np.ndarray:
    # Crowns are drawn onto the unshadowed image; undo nothing, just blend over the shadowed one.
    return img * (1 - cover[None]) + tree_img * cover[None] * np.maximum(mul, 0.8)


