"""The U-Net: its layers, input normalisation and receptive field. Only ``keras.*`` APIs, so the
same code runs on TensorFlow, JAX and PyTorch. The bundle that holds a trained one is
``bundle.py``; the engines that run it fast are ``engines.py``."""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)


def build_unet(
    bands: int = 3,
    *,
    depth: int = 4,
    base_filters: int = 32,
    batch_norm: bool = True,
    dropout: float = 0.1,
    name: str = "car_unet",
):
    """Build a U-Net that maps (H, W, bands) float images to (H, W, 1) car probability.

    H and W are left open so the same model predicts windows of any size divisible by
    ``2**depth``. The head is a 1x1 sigmoid convolution computed in float32, so mixed precision
    never rounds probabilities or the loss.
    """
    import keras
    from keras import layers

    def conv_block(x, filters: int, prefix: str):
        for i in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                              kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
            if batch_norm:
                x = layers.BatchNormalization(name=f"{prefix}_bn{i}")(x)
            x = layers.Activation("relu", name=f"{prefix}_relu{i}")(x)
        return x

    inputs = keras.Input(shape=(None, None, bands), name="image")
    x = inputs
    skips = []
    # === Encoder ===
    for level in range(depth):
        x = conv_block(x, base_filters * 2**level, f"enc{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    # === Bottleneck ===
    x = conv_block(x, base_filters * 2**depth, "bottleneck")
    if dropout:
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    # === Decoder ===
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(base_filters * 2**level, 2, strides=2, padding="same",
                                   name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skips[level]])
        x = conv_block(x, base_filters * 2**level, f"dec{level}")
    # === Head ===
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="car_prob")(x)
    return keras.Model(inputs, outputs, name=name)


def normalize(image: np.ndarray, normalization: dict) -> np.ndarray:
    """Scale a (rows, cols, bands) image to float32 with the bundle's per-band mean and std."""
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization["std"], dtype=np.float32)
    return (image.astype(np.float32) - mean) / std


# === Inference helpers ===

def receptive_field(model) -> int | None:
    """Side in input pixels of the region that one output pixel of ``model`` depends on.

    Walks the functional graph (nested models included) with the usual recurrence: a kxk
    convolution or pooling adds ``(k - 1) * jump`` pixels, a stride multiplies the jump (the
    input pixels between neighbouring outputs), an up-sampling divides it; where branches meet
    (U-Net skips), the larger field wins. Predict sizes its window overlap from this, so a pixel
    is only taken from windows that see all of its context.

    Returns:
        The receptive field's side in pixels, or None when the graph holds a layer it does not
        know how to measure (a custom layer that mixes pixels).
    """
    try:
        field, _ = _field_of(model, 1.0, 1.0)
    except _UnknownLayerError:
        return None
    return int(math.ceil(field))


class _UnknownLayerError(Exception):
    pass


# Layers that keep every pixel's value a function of that pixel alone (or of the same pixel of
# several inputs): they leave the receptive field as it is.
_POINTWISE = ("InputLayer", "Activation", "BatchNormalization", "Dropout", "SpatialDropout2D",
              "Concatenate", "Add", "Multiply", "Subtract", "Average", "Maximum", "Minimum",
              "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax", "LayerNormalization",
              "GroupNormalization", "Rescaling", "Normalization", "Identity", "Lambda",
              "GaussianNoise", "GaussianDropout", "Cropping2D", "ZeroPadding2D", "Dense")


def _pair(value) -> int:
    return int(max(value)) if isinstance(value, (tuple, list)) else int(value)


def _field_of(model, field_in: float, jump_in: float) -> tuple[float, float]:
    """(field, jump) of ``model``'s first output given its inputs' (field, jump)."""
    state = {id(t): (field_in, jump_in) for t in model.inputs}
    for layer in model.layers:
        ins = layer.input if isinstance(layer.input, (list, tuple)) else [layer.input]
        known = [state[id(t)] for t in ins if id(t) in state]
        if not known:
            if type(layer).__name__ == "InputLayer":
                continue
            raise _UnknownLayerError(layer.name)
        field, jump = max(known)
        kind = type(layer).__name__
        if hasattr(layer, "layers") and hasattr(layer, "inputs"):  # a nested model
            field, jump = _field_of(layer, field, jump)
        elif kind == "Conv2DTranspose":
            stride = _pair(layer.strides)
            field += (math.ceil(_pair(layer.kernel_size) / stride) - 1) * jump
            jump /= stride
        elif kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            field += (_pair(layer.kernel_size) - 1) * _pair(layer.dilation_rate) * jump
            jump *= _pair(layer.strides)
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            field += (_pair(layer.pool_size) - 1) * jump
            jump *= _pair(layer.strides)
        elif kind == "UpSampling2D":
            jump /= _pair(layer.size)
        elif kind not in _POINTWISE:
            raise _UnknownLayerError(layer.name)
        outs = layer.output if isinstance(layer.output, (list, tuple)) else [layer.output]
        for t in outs:
            state[id(t)] = (field, jump)
    return state[id(model.outputs[0])]
