"""Settings for every stage: pydantic models, loaded from YAML plus ``--set`` overrides.

Paths never live here: they come from the command line (the Makefile's variables).
Every model forbids unknown keys, so a misspelled setting fails loudly instead of being ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import InputError, SettingsError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SampleConfig(_Section):
    """The generated sample scenes (``make sample``)."""

    seed: int = Field(0, description="Random seed; the same seed gives byte-identical files.")
    gsd: float = Field(0.15, gt=0, description="Ground sample distance of the scenes in metres.")
    train_scenes: int = Field(4, ge=1, description="Labelled training scenes in raw/images.")
    incoming_scenes: int = Field(2, ge=1, description="Scenes to predict in incoming/ (with truth).")
    width: int = Field(1200, ge=64, description="Scene width in pixels (one scene is made narrower).")
    height: int = Field(1000, ge=64, description="Scene height in pixels.")
    epsg: int = Field(32633, description="Projected CRS of the scenes (a UTM zone).")
    style: Literal["default", "overcast", "evening", "faded"] = Field(
        "default", description="Light and camera of the flight (generalisation tests).")
    sparse: bool = Field(
        True, description="The last scene of each set of 2 or more (training, incoming) is a "
        "sparse residential street: cars on 1-3% of the pixels.")


class BaseConfig(_Section):
    """The base model's generated training set (``make base``): many small samples, each with
    its own seed, GSD, light and UTM zone, so the base learns cars rather than one scene."""

    variants: int = Field(12, ge=1, description="Generated samples the base trains on.")
    seed: int = Field(1000, description="Seed of the first variant (the next ones count up).")
    gsd_min: float = Field(0.05, gt=0, description="Finest GSD of the variants, metres.")
    gsd_max: float = Field(0.30, gt=0, description="Coarsest GSD of the variants, metres.")
    styles: list[Literal["default", "overcast", "evening", "faded"]] = Field(
        ["default", "overcast", "evening"], min_length=1,
        description="Light and camera styles, in turn ('faded' is held out to test the base on).")
    train_scenes: int = Field(2, ge=1, description="Training scenes per variant.")
    width: int = Field(800, ge=64, description="Scene width in pixels.")
    height: int = Field(800, ge=64, description="Scene height in pixels.")

    @model_validator(mode="after")
    def _range(self) -> BaseConfig:
        if self.gsd_min > self.gsd_max:
            raise ValueError(f"base.gsd_min ({self.gsd_min}) must not exceed base.gsd_max "
                             f"({self.gsd_max})")
        return self


class TileConfig(_Section):
    """Cutting scenes into chips (``make tiles``)."""

    chip_size: int = Field(256, ge=16, description="Chip width and height in pixels.")
    overlap: int = Field(32, ge=0, description="Pixels shared by neighbouring chips.")
    min_valid_fraction: float = Field(
        0.5, ge=0, le=1, description="Chips with less valid (non-nodata) area are skipped."
    )
    gsd: float | None = Field(
        None, gt=0, description="Resample every scene to this GSD in metres (None = keep native)."
    )
    bands: list[int] = Field(
        default_factory=lambda: [1, 2, 3], description="1-based band indexes, in model order."
    )
    resampling: Literal["bilinear", "cubic", "lanczos"] = Field(
        "bilinear", description="Resampling for imagery when a scene is brought to `gsd`."
    )
    geographic: Literal["reproject", "refuse"] = Field(
        "refuse",
        description="A scene in degrees is refused (as predict does), or reprojected to its "
        "UTM zone for training.",
    )
    val_fraction: float = Field(
        0.2, ge=0, lt=1, description="Share of chips (or scenes) held out for validation."
    )
    split_block_m: float = Field(
        60.0, gt=0, description="Side of the spatial blocks used to split a single scene, metres."
    )
    seed: int = Field(0, description="Seed of the train/validation split.")


class LabelConfig(_Section):
    """Rasterizing car footprints into chip masks (``make masks``)."""

    all_touched: bool = Field(False, description="Burn every pixel a polygon touches.")
    point_length_m: float = Field(4.5, gt=0, description="Footprint length for Point labels.")
    point_width_m: float = Field(1.9, gt=0, description="Footprint width for Point labels.")
    weight_map: bool = Field(
        True, description="Write U-Net gap weights (Ronneberger eq. 2) next to each mask."
    )
    overlaps: Literal["ignore", "background", "car"] = Field(
        "ignore", description="Pixels covered by two or more labels (boxes of cars parked "
        "close overlap where the cars do not): 'ignore' burns them as background with zero "
        "weight in the gap weight map, so each label stays its own blob and the loss learns "
        "nothing there; 'background' teaches them as the gap between cars (with the gap "
        "weight; on box-labelled sample scenes training collapsed to no cars); 'car' burns them "
        "as car (touching labels merge into one blob).")
    w0: float = Field(10.0, ge=0, description="Peak extra weight in the gaps between cars.")
    sigma_m: float = Field(0.75, gt=0, description="Width of the gap weight falloff, metres.")


class AugmentConfig(_Section):
    """albumentations applied to chip, mask and weights together."""

    flips: bool = Field(True, description="Horizontal/vertical flips and 90 degree rotations.")
    scale_rotate: bool = Field(True, description="Scale (GSD) and any-angle rotation jitter.")
    scale_limit: float = Field(
        0.2, ge=0, lt=1, description="Scale jitter +-share (0.2 = GSD 0.12-0.18 m for 0.15 m).")
    rotate_limit: float = Field(
        180.0, ge=0, le=180, description="Rotation jitter +-degrees (fill is ignored, mask 255).")
    color: bool = Field(True, description="Brightness, contrast, hue jitter.")
    exposure: bool = Field(
        True, description="Exposure, gamma and per-channel gains (white balance) of real flights.")
    haze: bool = Field(True, description="Haze: a flat veil of light over the chip.")
    shadows: bool = Field(True, description="Random soft shadow polygons (buildings, trees).")
    blur_noise: bool = Field(True, description="Blur, sensor noise and JPEG compression.")


class TrainConfig(_Section):
    """The U-Net and its training run (``make train``)."""

    depth: int = Field(4, ge=1, le=6, description="Down-sampling levels of the U-Net.")
    base_filters: int = Field(
        16, ge=4, description="Filters of the first level (doubling per level); 16 fits a CPU "
        "budget, 32 suits a GPU.")
    batch_norm: bool = Field(True, description="Batch normalisation after each convolution.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout at the bottleneck.")
    epochs: int = Field(40, ge=1, description="Maximum epochs.")
    steps_per_epoch: int | None = Field(
        None, ge=1, description="Batches per epoch (None = one pass over the training chips)."
    )
    batch_size: int = Field(8, ge=1, description="Chips per batch.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak Adam learning rate (cosine decay).")
    dice_weight: float = Field(0.0, ge=0, description="Weight of the Dice loss added to BCE.")
    use_gap_weights: bool = Field(True, description="Multiply BCE by the gap weight maps.")
    positive_fraction: float | None = Field(
        0.7, ge=0, le=1, description="Share of chips with cars per batch (None = natural ratio)."
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    init: str = Field(
        "base", description="Starting weights: 'base' (the shipped base model, when the U-Net "
        "has its shape), 'scratch', or the folder of another bundle to fine-tune.")
    pretrained_encoder: str | None = Field(
        None, description="keras.applications encoder name (e.g. 'ResNet50'); None = from scratch."
    )
    max_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget; training ends cleanly when it is spent."
    )
    early_stopping_patience: int | None = Field(
        8, ge=1, description="Validations without a gain before stopping (None = never).")
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the run (of max_minutes when set, else of the "
        "steps) with a linear learning-rate warm-up; cosine decay over the rest.")
    validations: int = Field(
        12, ge=1, description="With max_minutes and no steps_per_epoch: epochs are sized so "
        "validation runs about this many times within the budget.")
    select_by: Literal["object_f1", "iou"] = Field(
        "object_f1", description="Validation score that keeps the best weights: object F1 at "
        "IoU 0.5 (threshold 0.5, vectors.min_area_m2) or pixel IoU.")
    crop_size: int | None = Field(
        128, ge=16, description="Train on random crops of this size from each chip "
        "(None = whole chips; chips smaller than this are used whole); validation always sees "
        "whole chips. 128 px crops cost a quarter of a 256 px chip per step on a CPU.")
    box_labels: bool | Literal["auto"] = Field(
        False, description="Car labels are axis-aligned boxes: the loss ignores each box's "
        "corners and edge band so the model is not taught boxes. 'auto' = when most car blobs "
        "in the masks have only axis-aligned edges. Off by default: on the sample it lowered "
        "object F1 (README).")
    mixed_precision: Literal["auto", "on", "off", "bf16"] = Field(
        "auto", description="'auto' = mixed_float16 on a GPU, mixed_bfloat16 on a CPU with "
        "AVX-512 BF16 or AMX, else float32; 'on' = float16, 'bf16' = bfloat16."
    )
    cache_in_memory: bool = Field(True, description="Hold chips in RAM when they fit.")
    seed: int = Field(0, description="Seed for weights, sampling and augmentation.")


# ONNX Runtime's CPU kernels are float32: rather than ignore a bfloat16 asked for, say so.
ONNX_FLOAT32_ONLY = ("predict.engine onnxruntime runs float32 only: set predict.precision to "
                     "float32 or auto (or use engine keras or openvino for bfloat16)")


class PredictConfig(_Section):
    """Sliding-window inference and stitching (``make predict``)."""

    window: int = Field(
        2048, ge=16, description="Largest inference window in pixels (plus one lattice step, "
        "2**depth, so a window-sized scene off the lattice stays one window), independent of the "
        "training chip size (windows shrink to fit a smaller scene).")
    overlap: int | None = Field(
        None, ge=0, description="Pixels shared by neighbouring windows (None = from the model's "
        "receptive field).")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    tta: bool = Field(False, description="Average over flips (test-time augmentation).")
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Car threshold (None = the one stored in the model bundle)."
    )
    engine: Literal["auto", "keras", "openvino", "onnxruntime"] = Field(
        "auto", description="Inference engine; 'auto' = measured on first use on this CPU "
        "and model: the fastest installed engine whose cars match Keras float32 on the bundle's "
        "validation chips (logged, cached in MODEL_DIR/.engine-cache, measured again for another "
        "CPU, model or window). 'onnxruntime' runs float32 only. Failures fall back to Keras "
        "with a warning.")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Inference arithmetic; 'auto' = measured with the engine: bfloat16 "
        "where the CPU has bf16 instructions (AVX-512 BF16, AMX), it is faster and keeps the "
        "same cars (object F1 >= 0.995, count within 0.5%, p99 within 2/254), else float32 "
        "(onnxruntime + bfloat16 is an error).")

    @model_validator(mode="after")
    def _engine_precision(self) -> PredictConfig:
        if self.engine == "onnxruntime" and self.precision == "bfloat16":
            raise ValueError(ONNX_FLOAT32_ONLY)
        return self


DEFAULT_MIN_AREA_M2 = 3.0  # vectors.min_area_m2 for a model that recorded no choice
DEFAULT_MIN_TRUNCATED_AREA_M2 = 5.0  # vectors.min_truncated_area_m2, likewise


class VectorConfig(_Section):
    """Car polygons from the stitched mask (``make vectors``)."""

    window: int = Field(2048, ge=64, description="Vectorizing window size in pixels.")
    halo: int = Field(64, ge=8, description="Extra pixels read around each window.")
    min_area_m2: float | None = Field(
        None, ge=0, description="Smaller blobs are dropped (the smallest cars cover ~4.5 m2). "
        "None = the model's choice (made on validation by object F1, recorded in the mask's "
        f"tags by predict), else {DEFAULT_MIN_AREA_M2} m2.")
    min_mean_prob: float | None = Field(
        None, ge=0, le=1, description="Cars with a lower mean probability are dropped. None = "
        "the model's choice (as min_area_m2), else 0.")
    max_area_m2: float = Field(40.0, gt=0, description="Larger blobs are dropped.")
    split_touching: bool = Field(True, description="Split touching cars (watershed).")
    min_car_width_m: float = Field(1.4, gt=0, description="Smallest car width the splitter keeps.")
    max_car_area_m2: float = Field(
        12.0, gt=0, description="Blobs larger than one car of this area are split even when "
        "car-shaped (two cars side by side).")
    car_length_m: float = Field(
        4.5, gt=0, description="Typical car length: a blob larger than one car is cut into the "
        "pieces closest to a car of this length and `car_width_m` (or kept whole when it is "
        "closest to one car).")
    car_width_m: float = Field(1.85, gt=0, description="Typical car width (see car_length_m).")
    min_car_length_m: float = Field(
        3.0, gt=0, description="Smallest car length the splitter keeps: a split leaving a "
        "shorter piece (a fragment of one car) is not made.")
    regularize: bool = Field(False, description="Replace each polygon by its min. rotated rectangle.")
    min_truncated_area_m2: float | None = Field(
        None, ge=0, description="A car cut by the scene's valid-data edge (`truncated`) smaller "
        "than this is dropped: a sliver of a car that lies mostly outside the scene, which "
        "people counting cars leave out (0 keeps every sliver). None = the model's choice "
        "(learnt from the labels on validation chips at the scene's edge, recorded in the "
        f"mask's tags by predict), else {DEFAULT_MIN_TRUNCATED_AREA_M2} m2.")
    format: Literal["gpkg", "geojson", "parquet"] = Field("gpkg", description="Output format.")

    def resolve(self, chosen: dict | None = None) -> VectorConfig:
        """These settings with ``min_area_m2``/``min_mean_prob``/``min_truncated_area_m2``
        filled in where left unset: from ``chosen`` (the model's post-processing, as predict
        records it), else defaults. A value the user set always wins."""
        chosen = chosen or {}
        truncated = self.min_truncated_area_m2 if self.min_truncated_area_m2 is not None \
            else float(chosen.get("min_truncated_area_m2", DEFAULT_MIN_TRUNCATED_AREA_M2))
        area = self.min_area_m2 if self.min_area_m2 is not None else float(
            chosen.get("min_area_m2", DEFAULT_MIN_AREA_M2))
        prob = self.min_mean_prob if self.min_mean_prob is not None else float(
            chosen.get("min_mean_prob", 0.0))
        return self.model_copy(update={"min_area_m2": area, "min_mean_prob": prob,
                                       "min_truncated_area_m2": truncated})


class BatchConfig(_Section):
    """Batch products: one car layer, mosaics, counts, STAC catalog (``make batch``)."""

    crs: str | None = Field(
        None, description="CRS of the batch car layer when scenes differ in CRS (e.g. "
        "'EPSG:32633'); None = the UTM zone of the batch's centre. Scenes sharing a CRS keep it.")
    density_cell_m: float = Field(
        50.0, gt=0, description="Cell side of the density grid (density.tif), metres.")
    interval: float = Field(
        0.9, gt=0, lt=1, description="Coverage of the per-zone count interval.")
    match_iou: float = Field(
        0.3, gt=0, le=1, description="Two scenes' cars in their overlap are one car when their "
        "footprints overlap by this IoU, or one lies mostly inside the other (a cut copy).")


class EvaluateConfig(_Section):
    """Metrics against ground truth (``make evaluate``)."""

    match_by: Literal["iou", "centroid"] = Field("iou", description="Object matching criterion.")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="Minimum IoU for a match.")
    max_centroid_m: float = Field(1.5, gt=0, description="Maximum centroid distance for a match.")
    size_bins_m2: list[float] = Field(
        default_factory=lambda: [0, 6, 8, 10, 1e9], description="Car area bins for recall by size."
    )


class SuggestConfig(_Section):
    """Where to label next (``make suggest``): squares ranked by the model's uncertainty."""

    top_n: int = Field(20, ge=1, description="Squares written to label_next.gpkg.")
    band: float = Field(
        0.2, gt=0, lt=1, description="A pixel is uncertain when its probability lies within "
        "this of the car threshold.")
    flip: bool = Field(
        True, description="Score disagreement with the horizontally flipped prediction (two "
        "forward passes per square, for the best flip_candidates x top_n squares only).")
    flip_candidates: int = Field(
        3, ge=1, description="How many times top_n squares get the flip check.")
    training: bool = Field(
        True, description="Rank the training scenes too (predicted once into a scratch "
        "folder, compared with their labels).")
    training_share: float = Field(
        0.5, ge=0, le=1, description="Share of top_n taken from the training scenes (the "
        "rest from the batch; either spills over when the other has too few squares).")
    min_valid_fraction: float = Field(
        0.5, ge=0, le=1, description="Squares with less valid (non-nodata) area are skipped.")
    spacing: float = Field(
        1.5, ge=0, description="A square whose centre lies within this many square sides of a "
        "better one of its scene is passed over (1.5: no neighbour, not even diagonally) "
        "until the spread squares run out; 0 keeps neighbours.")
    per_scene: float = Field(
        0.5, ge=0, le=1, description="At most this share of top_n (rounded up) from one scene "
        "while other scenes have squares left; 0 = no cap.")


class ReportConfig(_Section):
    """The HTML report (``make report``)."""

    crops: int = Field(4, ge=0, description="Example crops per scene.")
    crop_size: int = Field(256, ge=32, description="Crop size in pixels.")


class DistributedConfig(_Section):
    """Where batch work runs (Dask)."""

    scheduler: str | None = Field(
        None, description="Address of an existing Dask scheduler; None = embedded LocalCluster."
    )
    workers: int | None = Field(None, ge=1, description="LocalCluster workers (None = cores).")
    threads_per_worker: int = Field(1, ge=1, description="Threads per LocalCluster worker.")
    retries: int = Field(1, ge=0, description="Retries of a failing scene before it is reported.")


class Config(_Section):
    """All settings. Each stage reads only its own section."""

    sample: SampleConfig = Field(default_factory=SampleConfig)
    base: BaseConfig = Field(default_factory=BaseConfig)
    tile: TileConfig = Field(default_factory=TileConfig)
    labels: LabelConfig = Field(default_factory=LabelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    vectors: VectorConfig = Field(default_factory=VectorConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    suggest: SuggestConfig = Field(default_factory=SuggestConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        # Settings that only make sense together are checked here, up front, not per scene
        # after a cluster has started.
        if self.tile.overlap >= self.tile.chip_size:
            raise ValueError(f"tile.overlap ({self.tile.overlap}) must be smaller than "
                             f"tile.chip_size ({self.tile.chip_size})")
        if (self.predict.window is not None and self.predict.overlap is not None
                and self.predict.overlap >= self.predict.window):
            raise ValueError(f"predict.overlap ({self.predict.overlap}) must be smaller than "
                             f"predict.window ({self.predict.window})")
        if (self.vectors.min_area_m2 is not None
                and self.vectors.min_area_m2 >= self.vectors.max_area_m2):
            raise ValueError(f"vectors.min_area_m2 ({self.vectors.min_area_m2}) must be smaller "
                             f"than vectors.max_area_m2 ({self.vectors.max_area_m2})")
        if len(set(self.tile.bands)) != len(self.tile.bands) or min(self.tile.bands) < 1:
            raise ValueError(f"tile.bands {self.tile.bands} must be distinct 1-based band numbers")
        return self


# Which sections decide whether each stage's output is stale. Tiling does not depend on train
# settings, so changing `train.epochs` never redoes tiling.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "sample": ("sample",),
    "base": ("sample", "base"),
    "tile": ("tile",),
    "masks": ("tile", "labels"),
    "train": ("tile", "labels", "train"),
    "predict": ("predict",),
    "vectors": ("vectors",),
    "evaluate": ("evaluate",),
    "batch": ("batch",),
    "report": ("report",),
    # The threshold and training-scene predictions come from predict, the labels' burning
    # from labels.
    "suggest": ("predict", "labels", "suggest"),
}


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"{key} given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def _parse_value(text: str) -> Any:
    # YAML gives numbers, booleans, null and [lists] their types; plain words stay strings.
    return yaml.safe_load(text) if text != "" else ""


# An override starts with a dotted key and '='; anything else continues the previous value.
_OVERRIDE_START = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")


def split_overrides(text: str) -> list[str]:
    """Split make's ``SET="a.b=1 c.d=[1, 2, 3]"`` into overrides; values may hold spaces.

    Raises:
        SettingsError: the text does not start with ``dotted.key=``.
    """
    overrides: list[str] = []
    for token in text.split():
        if _OVERRIDE_START.match(token):
            overrides.append(token)
        elif overrides:
            overrides[-1] += " " + token
        else:
            raise SettingsError(f"SET {text!r}: expected dotted.key=value pairs, e.g. "
                                "SET=\"train.epochs=3 tile.bands=[1, 2, 3]\"")
    return overrides


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``dotted.key=value`` overrides to a nested settings dict (in place, returned)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--set {item!r}: expected dotted.key=value")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"--set {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = _parse_value(value.strip())
        except yaml.YAMLError as exc:  # a backtick, an unclosed bracket: YAML's own words
            problem = getattr(exc, "problem", None) or exc.__class__.__name__
            raise SettingsError(f"--set {item!r}: not a valid value ({problem}); quote it, "
                                "e.g. key='text'") from None
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML settings file, apply overrides, validate.

    Raises:
        InputError: the file is missing, not YAML, or holds an unknown or invalid setting.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_StrictLoader) or {}
        except FileNotFoundError:
            raise InputError(f"{path}: config file not found") from None
        except yaml.constructor.ConstructorError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
            raise SettingsError(f"{path}: line {line}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a mapping of sections at the top level")
    overrides = overrides or []
    apply_overrides(data, overrides)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown setting (misspelled?)" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        # Blame what the user typed: the --set/SET override that holds the key, else the file.
        given = [o.partition("=")[0].strip() for o in overrides]
        source = next((f"--set {k}" for k in given if (where and (
            k == where or k.startswith(where + ".") or where.startswith(k + ".")))
            or (not where and k in msg)), None)
        if source is None:
            source = f"{path}" if path is not None else "settings"
            if where:
                source += f": {where}"
        raise SettingsError(f"{source}: {msg}") from None


def stage_settings(cfg: Config, stage: str) -> dict:
    """The settings that decide whether ``stage``'s output is stale, as plain JSON data."""
    return {name: getattr(cfg, name).model_dump(mode="json") for name in STAGE_SECTIONS[stage]}


def settings_digest(settings: dict) -> str:
    """A short stable fingerprint of a settings dict."""
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
