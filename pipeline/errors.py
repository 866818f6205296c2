"""Errors: bad input told apart from bugs by type, each with one line for the user.

Like rasterio's errors, each subclasses the built-in a caller would otherwise catch (a missing
file is also a FileNotFoundError). :func:`first_line` finds GDAL's own reason in a chain.
"""

from __future__ import annotations

import errno


class InputError(ValueError):
    """Bad input: the message names the file and what is wrong; the CLI prints it as one line."""


class InputNotFound(InputError, FileNotFoundError):
    """An input file or folder that is not there."""


class RasterInputError(InputError):
    """A raster that cannot be read or used (corrupt, not georeferenced, wrong bands or dtype)."""


class VectorInputError(InputError):
    """A vector file that cannot be read or used (corrupt, no CRS, implausible coordinates)."""


class SettingsError(InputError):
    """A setting that is unknown, invalid, or inconsistent with another."""


class OutputConflict(InputError):
    """An output folder that would write into or over an input."""


# Exit status of a batch stage when some scenes failed and the others are done: the next stage
# still runs on what was done, and make fails at the end (2 = bad input, nothing done).
EXIT_PARTIAL = 3


def first_line(exc: BaseException) -> str:
    """The most telling line of an error: GDAL's own reason rather than rasterio's wrapper.

    rasterio raises "Read failed. See previous exception for details." with GDAL's message as
    the cause; a user needs the cause, and to know the file is truncated or corrupt.
    """
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    texts = [t for t in (str(e).strip().splitlines()[0] for e in chain if str(e).strip())
             if "see previous exception" not in t.lower()]
    text = texts[-1] if texts else chain[0].__class__.__name__
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain) \
            or any("no space left" in t.lower() for t in texts):
        return "no space left on device"
    if any(k in text for k in ("TIFFRead", "Read error", "TIFFFillTile", "TIFFFillStrip",
                               "IReadBlock", "not recognized as a supported file format",
                               "not a TIFF", "Cannot read TIFF header")):
        return f"file is truncated or corrupt ({text})"
    return text
