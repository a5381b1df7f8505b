"""Whole-slide images: one reader over OpenSlide and plain images, with a resolved pixel size.

Backends, tried in this order:

1. OpenSlide (``openslide-python`` + the ``openslide-bin`` wheel) for every format it detects: SVS,
   NDPI, MRXS, SCN, BIF, DICOM, generic tiled pyramidal TIFF ... Regions come back RGBA and are
   composited over white, so areas outside the image (and transparent slide background) are white.
2. tifffile for TIFFs that OpenSlide rejects (stripped, untiled) or misreads (OME-TIFF: OpenSlide
   ignores its SubIFD pyramid and its ``PhysicalSizeX``). Pyramid levels are the series' ``levels``;
   a level is read through zarr when it is importable (only the tiles a region touches are
   decoded), else decoded whole on first use.
3. Pillow for PNG, JPEG and anything else it opens, held in memory as one level.

Pixel size (µm per level-0 pixel), first found wins: the ``mpp`` argument (``--mpp`` or the
cohort's metadata, ranked above the file because embedded resolutions are sometimes 10x wrong:
docs/formats.md, "wsis/{id}.* and metadata/{id}.json") > the file (``openslide.mpp-x/y``; Aperio
``MPP =`` in ImageDescription; TIFF X/YResolution with ResolutionUnit centimetre or inch; OME
``PhysicalSizeX/Y``; ImageJ ``unit=micron``) > :class:`~histoprism._core.errors.InputError`. PNG/JPEG
dpi is never used: it is a screen resolution.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from ..._core.errors import InputError

log = logging.getLogger(__name__)

NO_MPP = "no pixel size in the file; pass --mpp (µm per pixel)"
MPP_RANGE = (0.01, 50.0)  # µm/px a file may plausibly claim; 72-dpi defaults (353 µm) are not one
_UM_PER_UNIT = {"nm": 1e-3, "µm": 1.0, "um": 1.0, "micron": 1.0, "mm": 1e3, "cm": 1e4, "m": 1e6}
_TIFF_SUFFIXES = {".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff", ".btf"}


class WholeSlideImage:
    """An open slide. Use as a context manager or call :meth:`close`.

    Attributes
    ----------
    path : Path
    dimensions : (width, height) of level 0, pixels.
    mpp : µm per level-0 pixel (resolved, see the module docstring).
    level_dimensions : (width, height) per level, level 0 first.
    level_downsamples : level-0 pixels per level pixel, per level (1.0 first, increasing).
    backend : ``"openslide"``, ``"tifffile"`` or ``"pillow"``.
    """

    def __init__(self, path: Path, backend: _Backend, mpp: float) -> None:
        self.path = path
        self._backend = backend
        self.backend = backend.name
        self.mpp = mpp
        self.level_dimensions: list[tuple[int, int]] = list(backend.level_dimensions)
        self.level_downsamples: list[float] = list(backend.level_downsamples)
        self.dimensions = self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Pixels of ``level`` whose top-left is level-0 pixel (x, y) (OpenSlide's convention).

        Returns (height, width, 3) uint8 RGB; whatever lies outside the image is white (255).
        """
        ds = self.level_downsamples[level]
        return self.read_level(
            level, math.floor(x / ds + 1e-9), math.floor(y / ds + 1e-9), width, height
        )

    def read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`read_region` but (x, y) in pixels of ``level`` itself: exact on every level.

        Returns (height, width, 3) uint8 RGB, white outside the image.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} not in 0..{self.level_count - 1}")
        out = np.full((height, width, 3), 255, np.uint8)  # (h, w, 3)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, lw), min(y + height, lh)
        if x1 > x0 and y1 > y0:
            try:
                out[y0 - y : y1 - y, x0 - x : x1 - x] = self._backend.read(
                    level, x0, y0, x1 - x0, y1 - y0
                )
            except InputError:
                raise
            except Exception as exc:  # a corrupt tile or strip: each library its own types
                raise InputError(
                    f"cannot decode pixels of level {level} ({type(exc).__name__}: {exc})",
                    self.path,
                ) from exc
        return out

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample <= ``downsample`` (never upsample a coarser one).

        "<=" allows 1%: OpenSlide gives a halved level of an odd-sized image a downsample such as
        2.0004, and reading level 0 instead would cost 4x the pixels for no visible gain.
        """
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.01]
        return max(ok, key=lambda i: self.level_downsamples[i]) if ok else 0

    def thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide, longest side ``max_size`` pixels: (h, w, 3) uint8 RGB."""
        w0, h0 = self.dimensions
        scale = max(w0, h0) / max_size
        level = self.best_level(scale)
        lw, lh = self.level_dimensions[level]
        img = Image.fromarray(self.read_level(level, 0, 0, lw, lh))
        size = (max(1, round(w0 / scale)), max(1, round(h0 / scale)))
        return np.asarray(img.resize(size, Image.Resampling.LANCZOS))

    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> WholeSlideImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"WholeSlideImage({self.path.name!r}, {w}x{h}, mpp={self.mpp:g}, levels={self.level_count}, {self.backend})"


def open_wsi(path: str | Path, *, mpp: float | None = None) -> WholeSlideImage:
    """Open a whole-slide or plain image.

    Parameters
    ----------
    path : the image file.
    mpp : µm per level-0 pixel; overrides whatever the file says (metadata beats file:
        docs/formats.md).

    Raises
    ------
    InputError : missing or unreadable file, a bad ``mpp``, or no ``mpp`` given and none in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such image file", path)
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"pixel size must be a positive number of µm, got {mpp}", path)
    backend = _open_backend(path)
    try:
        resolved = mpp if mpp is not None else _mean_mpp(backend.file_mpp(), path)
    except BaseException:
        backend.close()
        raise
    return WholeSlideImage(path, backend, float(resolved))


# --- backends ---------------------------------------------------------------------------------


class _Backend:
    """What a backend provides: level geometry, in-bounds reads in level pixels, the file's mpp."""

    name: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:  # (h, w, 3) uint8
        raise NotImplementedError

    def file_mpp(self) -> tuple[float, float] | None:  # (x, y) µm per level-0 pixel
        return None

    def close(self) -> None:
        pass


def _open_backend(path: Path) -> _Backend:
    fmt = _openslide_format(path)
    if fmt is not None:
        backend = _OpenSlideBackend(path)
        if fmt == "generic-tiff" and _tiff_has_more_levels(path, backend.level_count):
            backend.close()  # an OME-TIFF: OpenSlide reads its level 0 only
            return _TiffBackend(path)
        return backend
    if path.suffix.lower() in _TIFF_SUFFIXES or _is_tiff(path):
        return _TiffBackend(path)
    return _PillowBackend(path)


def _openslide_format(path: Path) -> str | None:
    try:
        import openslide
    except ImportError:  # optional extra [wsi]; plain images still open
        log.debug("openslide not installed; reading %s without it", path)
        return None
    try:
        return openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        return None


class _OpenSlideBackend(_Backend):
    name = "openslide"

    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as e:
            raise InputError(f"OpenSlide cannot read this slide ({e})", path) from e
        self.level_count = self._slide.level_count
        self.level_dimensions = [tuple(d) for d in self._slide.level_dimensions]
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]

    def read(self, level, x, y, w, h):
        ds = self.level_downsamples[level]
        region = self._slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
        return _over_white(np.asarray(region))

    def file_mpp(self):
        props = self._slide.properties
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError):  # e.g. OME-TIFF's PhysicalSizeX, ImageJ's unit
            try:
                return _tiff_mpp(self.path) if _is_tiff(self.path) else None
            except Exception:  # tifffile absent or unable to parse what OpenSlide could
                return None
        return _plausible((mx, my), self.path, "openslide.mpp-x/y")

    def close(self):
        self._slide.close()


class _TiffBackend(_Backend):
    name = "tifffile"

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
        except Exception as e:  # tifffile raises TiffFileError, ValueError, IndexError ...
            raise InputError(f"not a readable TIFF ({e})", path) from e
        self._levels = list(series.levels) or [series]
        self._axes = series.axes
        if "Y" not in self._axes or "X" not in self._axes:
            raise InputError(f"TIFF series has axes {self._axes!r}, not an image", path)
        self.level_dimensions = [self._yx(s.shape)[::-1] for s in self._levels]
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = [(w0 / w + h0 / h) / 2 for w, h in self.level_dimensions]
        self._arrays: dict[int, object] = {}

    def _yx(self, shape) -> tuple[int, int]:
        return shape[self._axes.index("Y")], shape[self._axes.index("X")]

    def _array(self, level: int):
        """Level as something sliceable: a zarr array (lazy, per tile) or a decoded ndarray."""
        if level not in self._arrays:
            try:
                import zarr

                store = self._tif.series[0].aszarr(level=level)
                self._arrays[level] = zarr.open(store, mode="r")
            except Exception:  # no zarr, or one tifffile's store does not suit
                self._arrays[level] = self._levels[level].asarray()
        return self._arrays[level]

    def read(self, level, x, y, w, h):
        index = []
        for ax, n in zip(self._axes, self._levels[level].shape, strict=True):
            if ax == "Y":
                index.append(slice(y, y + h))
            elif ax == "X":
                index.append(slice(x, x + w))
            elif ax in "SC" and n in (3, 4):
                index.append(slice(None))
            else:
                index.append(0)  # first plane of Z/T/other axes, and of C when it is not colour
        block = np.asarray(self._array(level)[tuple(index)])
        kept = [ax for ax, i in zip(self._axes, index, strict=True) if not isinstance(i, int)]
        if len(kept) == 3 and kept[-1] not in "SC":  # planar (C, Y, X) -> (Y, X, C)
            block = np.moveaxis(block, 0, -1)
        return _to_rgb(block, self.path)

    def file_mpp(self):
        return _tiff_mpp(self.path, self._tif)

    def close(self):
        self._tif.close()


class _PillowBackend(_Backend):
    name = "pillow"

    def __init__(self, path: Path) -> None:
        self.path = path
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # asked-for file, not a bomb
        try:
            with Image.open(path) as img:
                img.load()
                rgba = np.asarray(img.convert("RGBA"))
        except Exception as e:  # PIL.UnidentifiedImageError, OSError, SyntaxError ...
            raise InputError(f"not a readable image ({type(e).__name__}: {e})", path) from e
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        self._image = _over_white(rgba)  # (H, W, 3)
        self.level_dimensions = [(self._image.shape[1], self._image.shape[0])]
        self.level_downsamples = [1.0]

    def read(self, level, x, y, w, h):
        return self._image[y : y + h, x : x + w]


# --- pixels -----------------------------------------------------------------------------------


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) RGBA uint8 -> (h, w, 3) RGB composited over white."""
    if np.all(rgba[..., 3] == 255):
        return np.ascontiguousarray(rgba[..., :3])
    rgb, alpha = rgba[..., :3].astype(np.float32), rgba[..., 3:].astype(np.float32) / 255
    return np.rint(rgb * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _to_rgb(block: np.ndarray, path: Path) -> np.ndarray:
    """(h, w[, c]) of any common dtype -> (h, w, 3) uint8."""
    if block.dtype != np.uint8:
        if block.dtype == np.uint16:
            block = (block // 257).astype(np.uint8)
        elif block.dtype.kind == "f":
            top = 1.0 if float(np.nanmax(block, initial=0)) <= 1 else 255.0
            block = np.clip(np.nan_to_num(block) * (255 / top), 0, 255).astype(np.uint8)
        else:
            raise InputError(f"unsupported pixel type {block.dtype}", path)
    if block.ndim == 3 and block.shape[-1] == 1:
        block = block[..., 0]
    if block.ndim == 2:
        return np.repeat(block[..., None], 3, axis=-1)
    if block.shape[-1] == 4:
        return _over_white(block)
    if block.shape[-1] == 3:
        return block
    raise InputError(f"expected 1, 3 or 4 channels, got {block.shape[-1]}", path)


# --- pixel size -------------------------------------------------------------------------------


def _mean_mpp(mpp_xy: tuple[float, float] | None, path: Path) -> float:
    if mpp_xy is None:
        raise InputError(NO_MPP, path)
    mx, my = mpp_xy
    if abs(mx - my) > 0.01 * max(mx, my):
        log.warning("%s: non-square pixels (%.4g x %.4g µm); using their mean", path, mx, my)
    return (mx + my) / 2


def _plausible(mpp_xy, path: Path, source: str) -> tuple[float, float] | None:
    lo, hi = MPP_RANGE
    if all(lo <= m <= hi for m in mpp_xy):
        return tuple(mpp_xy)
    log.warning("%s: ignoring %s = %s µm/px, not a microscope's pixel size", path, source, mpp_xy)
    return None


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _tiff_has_more_levels(path: Path, n_levels: int) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tif.is_ome and len(tif.series[0].levels) > n_levels
    except Exception:  # not tifffile's business then; OpenSlide reads it
        return False


def _tiff_mpp(path: Path, tif=None) -> tuple[float, float] | None:
    """Pixel size from a TIFF's own tags: OME, Aperio description, ImageJ, X/YResolution."""
    if tif is None:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return _tiff_mpp(path, tif)
    page = tif.pages.first if hasattr(tif.pages, "first") else tif.pages[0]
    found = (
        (_ome_mpp(tif.ome_metadata) if tif.is_ome else None, "OME PhysicalSizeX/Y"),
        (_aperio_mpp(page.description), "Aperio MPP"),
        (_resolution_mpp(page, tif), "TIFF X/YResolution"),
    )
    for mpp_xy, source in found:
        if mpp_xy is not None:
            return _plausible(mpp_xy, path, source)
    return None


def _ome_mpp(xml: str | None) -> tuple[float, float] | None:
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    pixels = next(
        (el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None
    )
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    out = []
    for ax in "XY":
        value = pixels.get(f"PhysicalSize{ax}", pixels.get("PhysicalSizeX"))
        unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
        if unit not in _UM_PER_UNIT:
            return None
        out.append(float(value) * _UM_PER_UNIT[unit])
    return out[0], out[1]


def _aperio_mpp(description: str) -> tuple[float, float] | None:
    if not description.startswith("Aperio"):
        return None
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    return (float(match[1]),) * 2 if match else None


def _resolution_mpp(page, tif) -> tuple[float, float] | None:
    """µm per pixel from X/YResolution (pixels per unit) and ResolutionUnit (2 inch, 3 cm)."""
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(int(page.resolutionunit))  # absent tag: inch
    if um_per_unit is None and tif.is_imagej:  # ImageJ: unit NONE, pixels per `unit` in metadata
        unit = (tif.imagej_metadata or {}).get("unit", "")
        um_per_unit = _UM_PER_UNIT.get(unit.replace("\\u00B5", "µ"))
    if um_per_unit is None:
        return None
    out = []
    for name in ("XResolution", "YResolution"):
        num, den = tags[name].value
        if num <= 0 or den <= 0:
            return None
        out.append(um_per_unit * den / num)
    return out[0], out[1]
