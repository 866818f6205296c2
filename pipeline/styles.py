"""QGIS styles: ``.qml`` sidecars beside rasters and a default style inside GeoPackages.

QGIS loads ``<name>.qml`` beside ``<name>.tif`` (or ``.vrt``) as the layer's default style, and
for a GeoPackage layer the row of the ``layer_styles`` table marked ``useAsDefault``. The
templates below are QGIS 3 QML; they carry both the ``<Option>`` maps of QGIS >= 3.26 and the
``<prop>`` elements older 3.x versions read.

- car layers: no fill, outline coloured by ``mean_prob`` (red below 0.5, orange, yellow-green,
  green above 0.9), so low-confidence cars stand out;
- probability rasters (uint8 0..254, 255 nodata): a ramp from transparent at 0 through yellow
  to red at 254; 255 transparent;
- mask rasters: 1 red, 0 and 255 transparent;
- density (cars/ha, float, nodata -9999): a white-to-purple ramp;
- zones: fill graduated by ``cars_per_ha``;
- squares to label next: outline graduated by ``rank``, the first ones red.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

from pipeline.files import atomic_path

QGIS_VERSION = "3.34.0"
_HEADER = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"

# (lower, upper, outline RGBA, label) of the car outline classes.
CAR_CLASSES = [
    (0.0, 0.5, "215,25,28,255", "mean_prob < 0.5"),
    (0.5, 0.75, "253,174,97,255", "0.5 - 0.75"),
    (0.75, 0.9, "166,217,106,255", "0.75 - 0.9"),
    (0.9, 1.0, "26,150,65,255", ">= 0.9"),
]


def _fill_symbol(name: str, fill: str, outline: str, width: float, style: str) -> str:
    props = {"color": fill, "outline_color": outline, "outline_style": "solid",
             "outline_width": str(width), "outline_width_unit": "MM", "style": style,
             "joinstyle": "miter"}
    options = "".join(f'<Option type="QString" name="{k}" value="{v}"/>' for k, v in props.items())
    legacy = "".join(f'<prop k="{k}" v="{v}"/>' for k, v in props.items())
    return (f'<symbol type="fill" name="{name}" alpha="1" clip_to_extent="1" force_rhr="0">'
            f'<layer class="SimpleFill" enabled="1" locked="0" pass="0">'
            f'<Option type="Map">{options}</Option>{legacy}</layer></symbol>')


def _graduated(attr: str, classes: list[tuple[float, float, str, str]], *, filled: bool) -> str:
    ranges, symbols = [], []
    for i, (lo, hi, rgba, label) in enumerate(classes):
        ranges.append(f'<range lower="{lo}" upper="{hi}" symbol="{i}" label={quoteattr(label)} '
                      'render="true"/>')
        if filled:
            fill = rgba.rsplit(",", 1)[0] + ",160"
            symbols.append(_fill_symbol(str(i), fill, "60,60,60,255", 0.26, "solid"))
        else:
            symbols.append(_fill_symbol(str(i), "0,0,0,0", rgba, 0.6, "no"))
    return (f'<renderer-v2 type="graduatedSymbol" attr="{attr}" graduatedMethod="GraduatedColor" '
            'symbollevels="0" enableorderby="0" forceraster="0">'
            f'<ranges>{"".join(ranges)}</ranges><symbols>{"".join(symbols)}</symbols>'
            '</renderer-v2>')


def cars_qml() -> str:
    """Car polygons: outline coloured by ``mean_prob``, no fill."""
    return (_HEADER + f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">'
            + _graduated("mean_prob", CAR_CLASSES, filled=False)
            + "<layerGeometryType>2</layerGeometryType></qgis>\n")


def zones_qml(max_density: float) -> str:
    """Zones: fill graduated by ``cars_per_ha`` in four equal classes up to ``max_density``."""
    top = max(float(max_density), 1.0)
    colours = ["237,248,251,255", "179,205,227,255", "140,150,198,255", "136,65,157,255"]
    classes = [(top * i / 4, top * (i + 1) / 4 if i < 3 else 1e9, c,
                f"{top * i / 4:.1f} - {top * (i + 1) / 4:.1f}" if i < 3 else f">= {top * 3 / 4:.1f}")
               for i, c in enumerate(colours)]
    return (_HEADER + f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">'
            + _graduated("cars_per_ha", classes, filled=True)
            + "<layerGeometryType>2</layerGeometryType></qgis>\n")


def suggest_qml(n: int) -> str:
    """Squares to label next: outline graduated by ``rank``, red for the first quarter."""
    colours = ["215,25,28,255", "253,174,97,255", "255,255,191,255", "171,217,233,255"]
    step = max(n / 4, 1.0)
    classes = [(1 + step * i - 0.5, 1 + step * (i + 1) - 0.5 if i < 3 else 1e9, c,
                f"rank {math.ceil(1 + step * i)}+") for i, c in enumerate(colours)]
    return (_HEADER + f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">'
            + _graduated("rank", classes, filled=False)
            + "<layerGeometryType>2</layerGeometryType></qgis>\n")


def _raster(renderer: str) -> str:
    return (_HEADER + f'<qgis version="{QGIS_VERSION}" styleCategories="Symbology">'
            f"<pipe>{renderer}</pipe><blendMode>0</blendMode></qgis>\n")


def _ramp(stops: list[tuple[float, str, int, str]], vmin: float, vmax: float,
          transparent: list[float]) -> str:
    items = "".join(f'<item value="{v}" color="{c}" alpha="{a}" label={quoteattr(label)}/>'
                    for v, c, a, label in stops)
    pixels = "".join(f'<pixelListEntry min="{v}" max="{v}" percentTransparent="100"/>'
                     for v in transparent)
    return (f'<rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1" '
            f'classificationMin="{vmin}" classificationMax="{vmax}" nodataColor="">'
            f"<rasterTransparency><singleValuePixelList>{pixels}</singleValuePixelList>"
            "</rasterTransparency><minMaxOrigin><limits>None</limits><extent>WholeRaster</extent>"
            "<statAccuracy>Estimated</statAccuracy></minMaxOrigin>"
            f'<rastershader><colorrampshader colorRampType="INTERPOLATED" classificationMode="1" '
            f'clip="0" minimumValue="{vmin}" maximumValue="{vmax}">{items}</colorrampshader>'
            "</rastershader></rasterrenderer>")


def probability_qml() -> str:
    """Probability (0..254 = 0..1, 255 nodata): transparent at 0, yellow, orange, red at 254."""
    stops = [(0, "#ffffb2", 0, "0"), (64, "#fecc5c", 120, "0.25"),
             (127, "#fd8d3c", 200, "0.5"), (190, "#f03b20", 235, "0.75"),
             (254, "#bd0026", 255, "1")]
    return _raster(_ramp(stops, 0, 254, transparent=[255]))


def mask_qml() -> str:
    """Car mask: 1 red; 0 (background) and 255 (nodata) transparent."""
    return _raster(
        '<rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">'
        '<rasterTransparency><singleValuePixelList>'
        '<pixelListEntry min="0" max="0" percentTransparent="100"/>'
        '<pixelListEntry min="255" max="255" percentTransparent="100"/>'
        "</singleValuePixelList></rasterTransparency><colorPalette>"
        '<paletteEntry value="0" color="#000000" alpha="0" label="background"/>'
        '<paletteEntry value="1" color="#e31a1c" alpha="255" label="car"/>'
        '<paletteEntry value="255" color="#000000" alpha="0" label="nodata"/>'
        "</colorPalette></rasterrenderer>")


def density_qml(max_density: float) -> str:
    """Cars per hectare: white (0) to dark purple (``max_density``); nodata transparent."""
    top = max(float(max_density), 1.0)
    stops = [(0, "#f7fcfd", 0, "0"), (top / 4, "#bfd3e6", 255, f"{top / 4:.1f}"),
             (top / 2, "#8c96c6", 255, f"{top / 2:.1f}"), (top, "#6e016b", 255, f"{top:.1f}")]
    return _raster(_ramp(stops, 0, top, transparent=[]))


def write_qml(raster: Path | str, qml: str) -> Path:
    """Write ``qml`` as the sidecar QGIS loads for ``raster`` (``<stem>.qml`` beside it)."""
    raster = Path(raster)
    target = raster.with_suffix(".qml")
    if target.exists() and target.read_text() == qml:
        return target  # unchanged: keep the mtime
    with atomic_path(target) as tmp:
        tmp.write_text(qml)
    return target


# QGIS's own schema of the GeoPackage style table (as QGIS creates it when saving a style).
LAYER_STYLES_SQL = """
CREATE TABLE IF NOT EXISTS layer_styles (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    f_table_catalog TEXT(256),
    f_table_schema TEXT(256),
    f_table_name TEXT(256),
    f_geometry_column TEXT(256),
    styleName TEXT(30),
    styleQML TEXT,
    styleSLD TEXT,
    useAsDefault BOOLEAN,
    description TEXT,
    owner TEXT(30),
    ui TEXT(30),
    update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now'))
)"""


def add_layer_style(gpkg: Path | str, layer: str, qml: str, *, name: str | None = None,
                    description: str = "carseg default style") -> None:
    """Store ``qml`` as ``layer``'s default style in the GeoPackage's ``layer_styles`` table.

    Write into a file that is not yet in place (inside ``atomic_path``): the table is changed
    with plain SQLite, which is not atomic with the layer itself.
    """
    con = sqlite3.connect(str(gpkg))
    try:
        row = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?",
                          (layer,)).fetchone()
        geometry_column = row[0] if row else "geom"
        con.execute(LAYER_STYLES_SQL)
        con.execute("DELETE FROM layer_styles WHERE f_table_name = ?", (layer,))
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, "
            "f_geometry_column, styleName, styleQML, styleSLD, useAsDefault, description, owner, "
            "ui) VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL)",
            (layer, geometry_column, name or layer, qml, description))
        # GeoPackage readers list only tables registered in gpkg_contents.
        con.execute("INSERT OR REPLACE INTO gpkg_contents (table_name, data_type, identifier, "
                    "last_change) VALUES ('layer_styles', 'attributes', 'layer_styles', "
                    "strftime('%Y-%m-%dT%H:%M:%fZ','now'))")
        con.commit()
    finally:
        con.close()


@contextlib.contextmanager
def quiet_style_table() -> Iterator[None]:
    """Silence pyogrio's "More than one layer found" for GeoPackages holding ``layer_styles``.

    The data layer comes first in the file, so the default layer read is the right one; the
    warning would only alarm a user (QGIS's own styled GeoPackages look the same).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="More than one layer found",
                                category=UserWarning)
        yield
