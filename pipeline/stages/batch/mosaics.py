"""Mosaics of the per-scene COGs: one VRT pair per CRS, rotated grids warped north-up."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio
from affine import Affine
from rasterio.crs import CRS

from pipeline.files import (
    atomic_path,
)
from pipeline.geo import NODATA
from pipeline.stages.batch.sources import SceneInfo
from pipeline.styles import (
    mask_qml,
    probability_qml,
    write_qml,
)

log = logging.getLogger(__name__)

# === Mosaics ===

def _crs_tag(crs: CRS) -> str:
    epsg = crs.to_epsg()
    if epsg:
        return f"EPSG_{epsg}"
    return "CRS_" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:8]


def vrt_xml(sources: list[SceneInfo], paths: list[Path], target: Path, crs: CRS) -> str:
    """A GDAL VRT mosaic of single-band uint8 rasters (255 nodata) that share ``crs``.

    Each source is a ComplexSource with NODATA 255, so a scene's nodata collar never hides its
    neighbour's data where they overlap; elsewhere the later scene (in name order) is on top.
    The mosaic's pixel size is the finest of the sources'.
    """
    res_x = min(abs(s.transform.a) for s in sources)
    res_y = min(abs(s.transform.e) for s in sources)
    bounds = [rasterio.transform.array_bounds(s.height, s.width, s.transform) for s in sources]
    west, south = min(b[0] for b in bounds), min(b[1] for b in bounds)
    east, north = max(b[2] for b in bounds), max(b[3] for b in bounds)
    width = max(1, math.ceil((east - west) / res_x - 1e-6))
    height = max(1, math.ceil((north - south) / res_y - 1e-6))
    parts = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f'  <SRS dataAxisToSRSAxisMapping="1,2">{escape(crs.to_wkt())}</SRS>',
             f"  <GeoTransform>{west!r}, {res_x!r}, 0.0, {north!r}, 0.0, {-res_y!r}"
             "</GeoTransform>",
             '  <VRTRasterBand dataType="Byte" band="1">',
             f"    <NoDataValue>{NODATA}</NoDataValue>",
             "    <ColorInterp>Gray</ColorInterp>"]
    for info, path in zip(sources, paths, strict=True):
        t = info.transform
        rel = os.path.relpath(path, target.parent)
        with rasterio.open(path) as src:
            block_y, block_x = src.block_shapes[0]
        x_off = (t.c - west) / res_x
        y_off = (north - t.f) / res_y
        x_size = info.width * abs(t.a) / res_x
        y_size = info.height * abs(t.e) / res_y
        parts += ["    <ComplexSource>",
                  f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
                  "      <SourceBand>1</SourceBand>",
                  f'      <SourceProperties RasterXSize="{info.width}" '
                  f'RasterYSize="{info.height}" DataType="Byte" BlockXSize="{block_x}" '
                  f'BlockYSize="{block_y}"/>',
                  f'      <SrcRect xOff="0" yOff="0" xSize="{info.width}" '
                  f'ySize="{info.height}"/>',
                  f'      <DstRect xOff="{x_off!r}" yOff="{y_off!r}" xSize="{x_size!r}" '
                  f'ySize="{y_size!r}"/>',
                  f"      <NODATA>{NODATA}</NODATA>",
                  "    </ComplexSource>"]
    parts += ["  </VRTRasterBand>", "</VRTDataset>"]
    return "\n".join(parts) + "\n"


def _by_crs(infos: list[SceneInfo], main_crs: CRS) -> list[tuple[str, CRS, list[SceneInfo]]]:
    """Scenes grouped by CRS as (file-name suffix, CRS, scenes): no suffix for the batch's CRS
    (or the most common one), ``_EPSG_xxxx`` for the others."""
    groups: dict[str, list[SceneInfo]] = {}
    for info in infos:
        groups.setdefault(info.crs.to_wkt(), []).append(info)
    main_wkt = main_crs.to_wkt()
    if main_wkt not in groups and groups:
        main_wkt = max(groups, key=lambda k: len(groups[k]))
    return [("" if wkt == main_wkt else f"_{_crs_tag(members[0].crs)}", members[0].crs, members)
            for wkt, members in groups.items()]


def warped_vrt_xml(source: Path, target: Path) -> tuple[str, Affine, int, int]:
    """A north-up GDAL warped VRT of a rotated raster: its XML, transform, width and height.

    A mosaic VRT's sources must be north-up; a scene on a rotated grid enters it through this
    (nearest neighbour, so mask values stay 0/1 and probabilities are not blended). The source
    is named relative to ``target``, so the batch folder can be moved with the scenes.
    """
    from xml.etree import ElementTree

    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as gdal_copy
    from rasterio.vrt import WarpedVRT

    with rasterio.open(source) as src, WarpedVRT(src) as vrt, MemoryFile(ext=".vrt") as mem:
        gdal_copy(vrt, mem.name, driver="VRT")
        root = ElementTree.fromstring(mem.read())
        transform, width, height = vrt.transform, vrt.width, vrt.height
    node = root.find(".//SourceDataset")
    node.text = os.path.relpath(source, target.parent)
    node.set("relativeToVRT", "1")
    return ElementTree.tostring(root, encoding="unicode"), transform, width, height


def _north_up(infos: list[SceneInfo], batch_dir: Path) -> tuple[list[SceneInfo], list[Path]]:
    """The scenes as mosaic sources: a rotated scene as north-up warped VRTs in ``warped/``."""
    sources, written = [], []
    for info in infos:
        if not (info.transform.b or info.transform.d):
            sources.append(info)
            continue
        paths = {}
        for kind, path in (("probability", info.prob), ("masks", info.mask)):
            target = batch_dir / "warped" / kind / f"{info.scene}.vrt"
            xml, transform, width, height = warped_vrt_xml(path, target)
            with atomic_path(target) as tmp:
                tmp.write_text(xml, encoding="utf-8")
            paths[kind] = target
            written.append(target)
        sources.append(dataclasses.replace(info, prob=paths["probability"], mask=paths["masks"],
                                           transform=transform, width=width, height=height))
    return sources, written


def write_mosaics(infos: list[SceneInfo], batch_dir: Path, main_crs: CRS) -> list[Path]:
    """``probability.vrt`` and ``masks.vrt`` per CRS (``*_EPSG_xxxx.vrt`` for the others).

    Scenes on a rotated grid enter through north-up warped VRTs in ``warped/<kind>/``.
    """
    north_up, warped = _north_up(infos, batch_dir)
    for old in batch_dir.glob("warped/*/*.vrt"):  # a rotated scene that left the batch
        if old not in warped:
            old.unlink()
    written = []
    for suffix, crs, members in _by_crs(north_up, main_crs):
        for kind, attr, qml in (("probability", "prob", probability_qml()),
                                ("masks", "mask", mask_qml())):
            target = batch_dir / f"{kind}{suffix}.vrt"
            xml = vrt_xml(members, [getattr(m, attr) for m in members], target, crs)
            with atomic_path(target) as tmp:
                tmp.write_text(xml, encoding="utf-8")
            write_qml(target, qml)
            written.append(target)
    for old in batch_dir.glob("*.vrt"):  # a CRS that left the batch
        if old not in written:
            old.unlink()
            old.with_suffix(".qml").unlink(missing_ok=True)
    return written
