"""Generated sample data: aerial-looking RGB orthophotos of car parks and streets, with car labels.

``make sample`` writes, deterministically from a seed, training scenes with their car footprints
(stored in EPSG:4326 so reprojection is always exercised), a batch of scenes to predict and their
ground truth (in the scenes' CRS). The scenes imitate 15 cm orthophotos: asphalt with texture,
cracks and oil stains, roads with lane markings, parking rows with painted lines, buildings with
roofs and rooftop units, grass and trees, one sun per scene casting every shadow, and cars of real
size and colour with a windshield, roof and rear window. Hard cases are made on purpose, as real
near-nadir city frames have them: cars parked nearly touching in rows and at the kerb along streets,
dark and grey cars on asphalt of the same tone, cars partly (at most 40%) under tree crowns and in
building shadows, cars cut by the scene's edge or nodata collar (labelled with their whole outline,
as people label them; evaluation ignores cars less than half in a scene), long vans, lorries and
buses that are not cars (never labelled), other car-like objects (containers, dumpsters, rooftop
units, road patches), and, with ``sample.sparse``, one sparse street scene per set where cars
cover 1-3% of the pixels. Any GSD from 0.10 to 0.30 m works (``sample.gsd``): sizes are in metres.

Read it part by part:

- ``objects``: car colours and kinds, light styles, and the objects a scene holds (data only);
- ``shapes``: noise and anti-aliased shape helpers;
- ``plan``: where things go (bands of road, lot, buildings, grass; car slots; trees);
- ``render``: drawing one scene (ground, shadows, cars, distractors, trees, camera);
- ``labels``: the car polygons and their attributes;
- ``writer``: scene specs, GeoTIFFs, label files, truth and the manifest (``make_sample``);
- ``plot``: a scene with its labels outlined, as a PNG.
"""

from pipeline.stages.sample.objects import (
    CAR_COLOURS,
    CAR_KINDS,
    STYLES,
    Box,
    Car,
    SceneRender,
    Style,
)
from pipeline.stages.sample.plot import plot_scene_with_labels
from pipeline.stages.sample.render import render_scene
from pipeline.stages.sample.writer import GENERATOR_VERSION, generate, make_sample, scene_specs

__all__ = [
    "CAR_COLOURS",
    "CAR_KINDS",
    "GENERATOR_VERSION",
    "STYLES",
    "Box",
    "Car",
    "SceneRender",
    "Style",
    "generate",
    "make_sample",
    "plot_scene_with_labels",
    "render_scene",
    "scene_specs",
]
