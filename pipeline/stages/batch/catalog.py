"""The STAC catalog (a Collection, one Item per scene) and the batch's provenance."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import rasterio
import shapely
from rasterio.crs import CRS

from pipeline.bundle import METADATA_FILE, MODEL_FILE
from pipeline.config import Config
from pipeline.files import (
    file_sha256,
    write_json,
)
from pipeline.stages.batch.sources import CATALOG, VERSION_PACKAGES, SceneInfo, _to_crs

log = logging.getLogger(__name__)

# === STAC catalog and provenance ===

def sha256_file(path: Path, cache: dict | None = None) -> str:
    """sha256 of a file; reused from ``cache`` (last run's manifest) when size and mtime agree."""
    path = Path(path)
    stat = path.stat()
    key = str(path.resolve())
    if cache and key in cache and cache[key][:2] == [stat.st_size, stat.st_mtime_ns]:
        return cache[key][2]
    digest = file_sha256(path)
    if cache is not None:
        cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
    return digest


def package_versions() -> dict:
    """Installed versions of the packages that made the outputs (no heavy imports)."""
    from importlib import metadata

    out = {}
    for name in VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def provenance(out_dir: Path, model_dir: Path, metadata: dict, cfg: Config,
               cache: dict) -> dict:
    """Model sha256 and training data fingerprint, every stage's settings, package versions."""
    settings = {}
    for path in sorted((out_dir / "settings").glob("*.json")):
        try:
            settings[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            log.warning("%s: unreadable settings file; left out of the provenance", path)
    model_settings = model_dir / "settings.json"
    if model_settings.exists():
        settings["train"] = json.loads(model_settings.read_text())
    elif "train_config" in metadata:
        settings["train"] = metadata["train_config"]
    settings["batch"] = cfg.batch.model_dump(mode="json")
    return {
        "model": {"path": str(model_dir), "sha256": sha256_file(model_dir / MODEL_FILE, cache),
                  "metadata_sha256": sha256_file(model_dir / METADATA_FILE, cache),
                  "data_fingerprint": metadata.get("data_fingerprint"),
                  "threshold": metadata.get("threshold"), "gsd": metadata.get("gsd"),
                  "bands": metadata.get("bands"), "val_metrics": metadata.get("val_metrics"),
                  "calibration": metadata.get("calibration"),
                  "versions": metadata.get("versions")},
        "settings": settings,
        "versions": package_versions(),
    }


def _scene_datetime(info: SceneInfo) -> tuple[datetime, str]:
    """The image's TIFFTAG_DATETIME when it has one, else the image (or mask) file time."""
    path = info.image if info.image is not None and info.image.exists() else info.mask
    try:
        with rasterio.open(path) as src:
            tag = src.tags().get("TIFFTAG_DATETIME")
        if tag:
            return datetime.strptime(tag.strip(), "%Y:%m:%d %H:%M:%S").replace(
                tzinfo=timezone.utc), "TIFFTAG_DATETIME"
    except (rasterio.errors.RasterioIOError, ValueError):
        pass
    return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc), "file_mtime"


def _asset(path: Path, media_type: str, roles: list[str], title: str, cache: dict):
    import pystac
    from pystac.extensions.file import FileExtension

    asset = pystac.Asset(href=str(path.resolve()), media_type=media_type, roles=roles,
                         title=title)
    # file:checksum is a multihash: 0x12 (sha2-256), 0x20 (32 bytes), then the digest.
    FileExtension.ext(asset, add_if_missing=False).apply(
        checksum="1220" + sha256_file(path, cache), size=path.stat().st_size)
    return asset


def write_catalog(infos: list[SceneInfo], batch_dir: Path, *, crs: CRS, kept, per_scene: dict,
                  products: list[Path], prov: dict, cache: dict) -> Path:
    """A STAC Collection (``catalog.json``): one Item per scene plus the batch products."""
    import pystac
    from pystac.extensions.file import FileExtension
    from pystac.extensions.projection import ProjectionExtension

    cog = pystac.MediaType.COG
    items, boxes, times = [], [], []
    for info in infos:
        fp = info.footprint.simplify(abs(info.transform.a)) if not info.footprint.is_empty \
            else shapely.box(*rasterio.transform.array_bounds(info.height, info.width,
                                                              info.transform))
        fp84 = _to_crs(fp, info.crs, CRS.from_epsg(4326))
        when, source = _scene_datetime(info)
        times.append(when)
        boxes.append(list(fp84.bounds))
        item = pystac.Item(
            id=info.scene, geometry=shapely.geometry.mapping(fp84), bbox=list(fp84.bounds),
            datetime=when,
            properties={"carseg:datetime_source": source,
                        "carseg:cars_detected": per_scene[info.scene]["detected"],
                        "carseg:cars_kept": per_scene[info.scene]["kept"],
                        "carseg:model_sha256": prov["model"]["sha256"]})
        proj = ProjectionExtension.ext(item, add_if_missing=True)
        epsg = info.crs.to_epsg()
        proj.apply(epsg=epsg, wkt2=None if epsg else info.crs.to_wkt(),
                   shape=[info.height, info.width], transform=list(info.transform)[:6],
                   bbox=list(rasterio.transform.array_bounds(info.height, info.width,
                                                              info.transform)))
        FileExtension.add_to(item)
        if info.image is not None and info.image.exists():
            item.add_asset("image", _asset(info.image, pystac.MediaType.GEOTIFF, ["data"],
                                           "source image", cache))
        item.add_asset("probability", _asset(info.prob, cog, ["data"],
                                             "car probability (0..254 = 0..1, 255 nodata)", cache))
        item.add_asset("mask", _asset(info.mask, cog, ["data"],
                                      "car mask (1 car, 0 background, 255 nodata)", cache))
        item.add_asset("cars", _asset(info.cars, _vector_media(info.cars), ["data"],
                                      "car polygons of this scene", cache))
        items.append(item)
    bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes)]
    collection = pystac.Collection(
        id="carseg-batch", title="Cars found by carseg",
        description="Cars segmented from the batch's GeoTIFFs: per-scene probability and mask "
                    "COGs, car polygons, and the merged batch products.",
        extent=pystac.Extent(pystac.SpatialExtent([bbox]),
                             pystac.TemporalExtent([[min(times), max(times)]])),
        license="other",
        extra_fields={"carseg:provenance": prov, "carseg:crs": crs.to_string(),
                      "carseg:cars": int(len(kept))})
    FileExtension.add_to(collection)
    for path in products:
        collection.add_asset(path.stem.replace(".", "_") + path.suffix.replace(".", "_"),
                             _asset(path, _product_media(path), ["data"], path.name, cache))
    target = batch_dir / CATALOG
    collection.set_self_href(str(target.resolve()))
    for item in items:
        collection.add_item(item)
        item.set_self_href(str((batch_dir / "items" / f"{item.id}.json").resolve()))
    collection.catalog_type = pystac.CatalogType.SELF_CONTAINED
    collection.make_all_asset_hrefs_relative()
    for asset in collection.assets.values():  # the products lie beside catalog.json
        asset.href = "./" + Path(asset.href).name
    # Items first, the collection last: a reader never finds links to missing items.
    items_dir = batch_dir / "items"
    wanted = set()
    for item in items:
        path = items_dir / f"{item.id}.json"
        wanted.add(path.name)
        write_json(path, item.to_dict(include_self_link=False, transform_hrefs=True))
    for old in items_dir.glob("*.json"):
        if old.name not in wanted:
            old.unlink()  # a scene that left the batch
    write_json(target, collection.to_dict(include_self_link=False, transform_hrefs=True))
    return target


def _vector_media(path: Path) -> str:
    return {".gpkg": "application/geopackage+sqlite3", ".geojson": "application/geo+json",
            ".parquet": "application/vnd.apache.parquet"}.get(path.suffix,
                                                              "application/octet-stream")


def _product_media(path: Path) -> str:
    return {".vrt": "application/xml", ".csv": "text/csv",
            ".tif": "image/tiff; application=geotiff; profile=cloud-optimized"}.get(
        path.suffix, _vector_media(path))
