"""Generated sample data: aerial-looking RGB orthophotos of car parks and streets, with car labels.

``make sample`` writes, deterministically from a seed, training scenes with their car footprints
(stored in EPSG:4326 so reprojection is always exercised), a batch of scenes to predict and their
ground truth (in the scenes' CRS). The scenes imitate 15 cm orthophotos: asphalt with texture,
cracks and oil stains, roads with lane markings, parking rows with painted lines, buildings with
roofs and rooftop units, grass and trees, one sun per scene casting every shadow, and cars of real
size and colour with a windshield, roof and rear window. Hard cases are made on purpose: cars parked
nearly touching, dark cars on dark asphalt, cars under trees and car-like objects that are not cars.

Read it part by part:

- ``objects``: car colours and kinds, light styles, and the objects a scene holds (data only);
- ``shapes``: noise and anti-aliased shape helpers;
- ``plan``: where things go (bands of road, lot, buildings, grass; car slots; trees);
- ``render``: drawing one scene (ground, shadows, cars, distractors, trees, camera);
- ``labels``: the car polygons and their attributes;
- ``writer``: scene specs, GeoTIFFs, label files, truth and the manifest (``make_sample``);
- ``plot``: a scene with its labels outlined, as a PNG.
"""

from pipeline.sample.objects import CAR_COLOURS, CAR_KINDS, STYLES, Box, Car, SceneRender, Style
from pipeline.sample.plot import plot_scene_with_labels
from pipeline.sample.render import render_scene
from pipeline.sample.writer import GENERATOR_VERSION, generate, make_sample, scene_specs

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
