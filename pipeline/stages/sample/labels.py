"""Car labels: one polygon per car, its full outline, with attributes in metres."""

from __future__ import annotations

import math

from pipeline.stages.sample.objects import SceneRender


def _car_frame(scene: SceneRender, name: str):
    """One row per car: its whole footprint (also where a tree or the scene's edge cuts it), as
    people label cars, with what makes it hard: ``under_tree`` (share of the footprint under
    crowns), ``in_shadow`` (mean shadow over it, 0-1) and ``in_scene`` (share on valid pixels).
    Vehicles that are not cars (long vans, lorries, buses) are never labelled.
    """
    import geopandas as gpd

    rows = [{"scene": name, "car_id": i + 1, "colour": c.colour, "kind": c.kind,
             "length_m": round(c.length_m, 3), "width_m": round(c.width_m, 3),
             # Compass azimuth of the car's front (rows grow southwards in the pixel frame).
             "heading_deg": round(math.degrees(math.atan2(math.cos(c.heading),
                                                          -math.sin(c.heading))) % 360, 2),
             "under_tree": round(c.under_tree, 3), "in_shadow": round(c.in_shadow, 3),
             "in_scene": round(c.in_scene, 3)} for i, c in enumerate(scene.cars)]
    columns = ["scene", "car_id", "colour", "kind", "length_m", "width_m", "heading_deg",
               "under_tree", "in_shadow", "in_scene"]
    return gpd.GeoDataFrame(rows, columns=columns, geometry=scene.footprints(), crs=scene.crs)

