"""Car labels: one polygon per car, its full outline, with attributes in metres."""

from __future__ import annotations

import math

from pipeline.sample.objects import SceneRender


def _car_frame(scene: SceneRender, name: str):
    import geopandas as gpd

    rows = [{"scene": name, "car_id": i + 1, "colour": c.colour, "kind": c.kind,
             "length_m": round(c.length_m, 3), "width_m": round(c.width_m, 3),
             # Compass azimuth of the car's front (rows grow southwards in the pixel frame).
             "heading_deg": round(math.degrees(math.atan2(math.cos(c.heading),
                                                          -math.sin(c.heading))) % 360, 2),
             "under_tree": round(c.under_tree, 3)} for i, c in enumerate(scene.cars)]
    columns = ["scene", "car_id", "colour", "kind", "length_m", "width_m", "heading_deg",
               "under_tree"]
    return gpd.GeoDataFrame(rows, columns=columns, geometry=scene.footprints(), crs=scene.crs)

