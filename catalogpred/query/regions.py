"""Angles and sky regions: great-circle separations, angle parsing, and the :class:`Cone` and :class:`Box`
regions a query selects with.

Each region says which points it holds (``contains``), which HEALPix leaves may hold them (``cover``: a
superset, from cdshealpix, the library hats uses), its DuckDB SQL condition (``sql``) and its lsdb search
(``lsdb_search``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

#: full sky in square degrees (4π sr).
SKY_AREA_DEG2 = 4 * math.pi * (180 / math.pi) ** 2
#: margin (deg) added to spatial regions when choosing leaves, so rounding never drops a leaf.
_COVER_MARGIN_DEG = 1e-7


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle separation in degrees (haversine; inputs in degrees)."""
    ra1, dec1, ra2, dec2 = map(np.radians, (ra1, dec1, ra2, dec2))
    s = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1))))


def angle_value(value, unit: str = "arcsec", name: str = "radius") -> float:
    """An angle as a finite float in ``unit``: a number (already in ``unit``), an astropy angle Quantity or
    ``Angle`` (``0.5 * u.deg``), or text: a number, a value with its unit (``"10arcsec"``, ``"0.5 arcmin"``,
    ``"1deg"``) or with primes (``"10'"``, ``'1.5"'``, ``"0d10m"``, as astropy ``Angle`` reads them).

    Raises
    ------
    ConfigError
        If ``value`` is none of those, is not finite, or is a number with a unit that is not an angle or is
        ambiguous: ``"10 m"`` (ten metres to astropy's units, ten arcminutes to its ``Angle``), ``"1h"``, ``"5s"``:
        write ``10arcmin``, ``15deg``, ``5arcsec``.
    """
    return _finite(_angle_number(value, unit, name), name, value)


def _angle_number(value, unit: str, name: str) -> float:
    """:func:`angle_value` before its finiteness check."""
    import re

    import astropy.units as u

    want = u.Unit(unit)
    if isinstance(value, str):
        text = value.strip()
        number = _float_or_none(text)
        if number is not None:
            return number
        if re.fullmatch(r"[-+]?[\d.]+(?:[eE][-+]?\d+)?\s*[hms]", text):
            raise ConfigError(f"{name} {value!r} is ambiguous: m, s and h are metres, seconds and hours as units "
                              f"but minutes, seconds and hours of arc in sexagesimal; give a number ({unit}) or a value "
                              "with an angle unit, e.g. 10arcsec, 0.5arcmin, 1deg")
        try:
            q = u.Quantity(text)
            if not q.unit.is_equivalent(u.deg):
                raise u.UnitsError(f"{q.unit} is not an angle")
        except (TypeError, ValueError, u.UnitsError):
            q = None  # primes and sexagesimal ("10'", "0d10m"): astropy's Angle reads them
        if q is None:
            from astropy.coordinates import Angle

            try:
                q = Angle(text)
            except (TypeError, ValueError, u.UnitsError) as exc:
                raise ConfigError(f"cannot read {name} {value!r} as an angle; give a number ({unit}) or a value "
                                  "with its unit, e.g. 10arcsec, 0.5arcmin, 1deg") from exc
        return float(q.to_value(want))
    if hasattr(value, "unit"):
        try:
            return float(u.Quantity(value).to_value(want))
        except (TypeError, ValueError, u.UnitsError) as exc:
            raise ConfigError(f"{name} must be an angle, got {value!r} ({exc})") from exc
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a number ({unit}), an angle Quantity or text such as '10arcsec', "
                          f"got {value!r}") from exc


def coordinate_value(value, axis: str) -> float:
    """RA (``axis="ra"``) or Dec (``"dec"``) in degrees, finite: a number (deg), an angle Quantity, or text: a
    number, a value with units (``"192.5deg"``, ``"12h50m07.6s"``, ``"+7d02m55s"``) or sexagesimal with ``:``
    or spaces, read in hours for RA and degrees for Dec (``"12:50:07.6"``, ``"-7:02:55"``). Not wrapped or
    range-checked here (a cone wraps RA into [0, 360) and checks Dec)."""
    import astropy.units as u
    from astropy.coordinates import Angle

    what = {"ra": "RA", "dec": "Dec"}[axis]
    if not isinstance(value, str):
        return angle_value(value, "deg", what)
    text = value.strip()
    number = _float_or_none(text)
    if number is None:
        try:  # a unit in the text wins over the sexagesimal unit
            number = float(Angle(text, unit="hourangle" if axis == "ra" else "deg").deg)
        except (TypeError, ValueError, u.UnitsError) as exc:
            raise ConfigError(f"cannot read {text!r} as {what}; give degrees (150.2), a value with units (10h00m48s, "
                              f"+2d12m) or sexagesimal ({'10:00:48' if axis == 'ra' else '-2:12:00'})") from exc
    return _finite(number, what, value)


def _float_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _finite(x: float, name: str, value) -> float:
    if not math.isfinite(x):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return x


@dataclass(frozen=True)
class Cone:
    """All points within ``radius_deg`` (great circle) of (``ra``, ``dec``), degrees."""

    ra: float
    dec: float
    radius_deg: float

    @property
    def radius_arcsec(self) -> float:
        return self.radius_deg * 3600.0

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        return angular_separation_deg(self.ra, self.dec, ra, dec) <= self.radius_deg

    def cover(self, order: int, pixels) -> set[int]:
        """The ``pixels`` (HEALPix nested, at ``order``) that may hold points of the cone (a superset)."""
        pix = np.asarray(sorted(pixels), np.int64)
        if self.radius_deg + _COVER_MARGIN_DEG >= 180 or len(pix) == 0:
            return set(pix.tolist())
        lon, lat = _pixel_centres(order, tuple(pix.tolist()))
        near = angular_separation_deg(self.ra, self.dec, lon, lat) <= (
            self.radius_deg + _max_pixel_radius_deg(order) + _COVER_MARGIN_DEG)
        cand = pix[near]
        if len(cand) == 0:
            return set()
        vlon, vlat, spacing = _pixel_boundaries(order, cand)
        dmin = angular_separation_deg(self.ra, self.dec, vlon, vlat).min(1)
        keep = (dmin - 0.6 * spacing - _COVER_MARGIN_DEG <= self.radius_deg) | (
            cand == _healpix_of(self.ra, self.dec, order))
        return set(cand[keep].tolist())

    def sql(self, ra: str = "ra", dec: str = "dec") -> str:
        """The same haversine cut as :meth:`contains`, as a DuckDB SQL condition."""
        s = (f"pow(sin(radians({dec} - ({self.dec!r})) / 2), 2) + cos(radians({self.dec!r})) * cos(radians({dec})) "
             f"* pow(sin(radians({ra} - ({self.ra!r})) / 2), 2)")
        return f"degrees(2 * asin(sqrt(least(greatest({s}, 0), 1)))) <= {self.radius_deg!r}"

    def lsdb_search(self):
        import lsdb

        return lsdb.ConeSearch(ra=self.ra, dec=self.dec, radius_arcsec=self.radius_arcsec)

    def __str__(self) -> str:
        return f"cone(ra={self.ra:g}, dec={self.dec:g}, radius={self.radius_arcsec:g} arcsec)"


@dataclass(frozen=True)
class Box:
    """RA/Dec ranges in degrees, boundaries included.

    ``ra_min > ra_max`` wraps through RA = 0 (``Box(350, 10, ...)`` is 350..360 and 0..10);
    ``ra_max - ra_min == 360`` is every RA.
    """

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    @property
    def full_ra(self) -> bool:
        return self.ra_max - self.ra_min >= 360

    @property
    def wraps(self) -> bool:
        return self.ra_min > self.ra_max

    def contains(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        in_dec = (dec >= self.dec_min) & (dec <= self.dec_max)
        if self.full_ra:
            return in_dec
        ra = np.mod(ra, 360.0)
        if self.wraps:
            return in_dec & ((ra >= self.ra_min) | (ra <= self.ra_max))
        return in_dec & (ra >= self.ra_min) & (ra <= self.ra_max)

    @property
    def ra_length(self) -> float:
        """RA extent in degrees (through RA 0 when the box wraps)."""
        return 360.0 if self.full_ra else (self.ra_max - self.ra_min) % 360.0

    def cover(self, order: int, pixels) -> set[int]:
        """The ``pixels`` (HEALPix nested, at ``order``) that may hold points of the box (a superset)."""
        pix = np.asarray(sorted(pixels), np.int64)
        m = _COVER_MARGIN_DEG
        if len(pix) == 0 or (self.full_ra and self.dec_min <= -90 and self.dec_max >= 90):
            return set(pix.tolist())
        # 1. each pixel lies in a cap of radius R around its centre: keep caps that meet the box
        lon, lat = _pixel_centres(order, tuple(pix.tolist()))
        big_r = _max_pixel_radius_deg(order)
        keep = (lat - big_r <= self.dec_max + m) & (lat + big_r >= self.dec_min - m)
        if not self.full_ra:
            half = _ra_half_width(lat, big_r)
            keep &= _arcs_overlap(lon - half, 2 * half, self.ra_min, self.ra_length)
        cand = pix[keep]
        if len(cand) == 0:
            return set()
        # 2. a pixel meets the box iff a boundary point is in it, or the box lies inside the pixel
        vlon, vlat, spacing = _pixel_boundaries(order, cand)
        pad = 0.6 * spacing[:, None] + m
        hit = (vlat - pad <= self.dec_max) & (vlat + pad >= self.dec_min)
        if not self.full_ra:
            half = _ra_half_width(vlat, pad)
            hit &= _arcs_overlap(vlon - half, 2 * half, self.ra_min, self.ra_length)
        inside = cand == _healpix_of(self.ra_min, self.dec_min, order)
        return set(cand[hit.any(1) | inside].tolist())

    def sql(self, ra: str = "ra", dec: str = "dec") -> str:
        c = f"{dec} >= {self.dec_min!r} AND {dec} <= {self.dec_max!r}"
        if self.full_ra:
            return c
        op = "OR" if self.wraps else "AND"
        return f"{c} AND ({ra} >= {self.ra_min!r} {op} {ra} <= {self.ra_max!r})"

    def lsdb_search(self):
        import lsdb

        return lsdb.BoxSearch(ra=(self.ra_min, self.ra_max if not self.full_ra else 360.0),
                              dec=(self.dec_min, self.dec_max))

    def __str__(self) -> str:
        return f"box(ra={self.ra_min:g}..{self.ra_max:g}, dec={self.dec_min:g}..{self.dec_max:g})"


def _healpix_of(ra: float, dec: float, order: int) -> int:
    import astropy.units as u
    from astropy.coordinates import Latitude, Longitude
    from cdshealpix.nested import lonlat_to_healpix

    return int(lonlat_to_healpix(Longitude(np.atleast_1d(ra) * u.deg), Latitude(np.atleast_1d(dec) * u.deg), order)[0])


@functools.lru_cache(maxsize=16)
def _pixel_centres(order: int, pixels: tuple) -> tuple[np.ndarray, np.ndarray]:
    from cdshealpix.nested import healpix_to_lonlat

    lon, lat = healpix_to_lonlat(np.asarray(pixels, np.uint64), order)
    return lon.deg, lat.deg


@functools.lru_cache(maxsize=32)
def _max_pixel_radius_deg(order: int) -> float:
    """Upper bound (deg) of the distance from a pixel's centre to any of its points at ``order``.

    Measured on every pixel at min(order, 6) from 16 boundary points each; scaled by 2^-Δorder
    above that, with a 10% allowance (edges bulge a little between samples; the scaling is not exact).
    """
    from cdshealpix.nested import healpix_to_lonlat, vertices

    k = min(order, 6)
    ipix = np.arange(12 * 4 ** k, dtype=np.uint64)
    lon, lat = healpix_to_lonlat(ipix, k)
    vlon, vlat = vertices(ipix, k, step=4)
    d = angular_separation_deg(lon.deg[:, None], lat.deg[:, None], vlon.deg, vlat.deg).max()
    return float(d) * 1.1 * 2.0 ** (k - order)


def _pixel_boundaries(order: int, pixels: np.ndarray):
    """32 boundary points per pixel (deg) and, per pixel, the largest gap between neighbouring points."""
    from cdshealpix.nested import vertices

    vlon, vlat = vertices(np.asarray(pixels, np.uint64), order, step=8)
    vlon, vlat = vlon.deg, vlat.deg
    gaps = angular_separation_deg(vlon, vlat, np.roll(vlon, -1, 1), np.roll(vlat, -1, 1))
    return vlon, vlat, gaps.max(1)


def _ra_half_width(dec, radius):
    """Half the RA extent (deg) of caps of ``radius`` centred at ``dec``; 180 when a cap holds a pole."""
    dec, radius = np.broadcast_arrays(np.asarray(dec, float), np.asarray(radius, float))
    polar = np.abs(dec) + radius >= 90
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.sin(np.radians(radius)) / np.cos(np.radians(dec))
    half = np.degrees(np.arcsin(np.clip(np.where(polar, 1.0, ratio), 0, 1)))
    return np.where(polar, 180.0, half)


def _arcs_overlap(a, len_a, b, len_b):
    """Whether RA arcs [a, a + len_a] and [b, b + len_b] (deg, any start) share a point."""
    eps = 1e-9
    return ((np.mod(b - a, 360.0) <= len_a + eps) | (np.mod(a - b, 360.0) <= len_b + eps)
            | (len_a >= 360) | (len_b >= 360))
