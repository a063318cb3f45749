"""Distance to round-trip time: the latency model every part of the scheduler shares.

Light in fibre covers about 200 km per millisecond; real paths are longer than the great
circle and cross routers, which a fixed per-path cost stands in for. The planner, the exact
baseline and the reported predictions all go through ``rtt_from_dot`` (``rtt_ms`` is the
same formula for one pair of coordinates) so they cannot disagree.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

EARTH_RADIUS_KM = 6371.0
FIBRE_KM_PER_MS = 200.0  # one way
FIXED_RTT_MS = 2.0  # switching, last mile and the serving stack's network hop
_MS_PER_RADIAN = 2.0 * EARTH_RADIUS_KM / FIBRE_KM_PER_MS  # there and back

FloatArray = npt.NDArray[np.float64]


def unit_vectors(lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike) -> FloatArray:
    """Points on the unit sphere, shape (n, 3): dot products give great-circle angles."""
    if isinstance(lat_deg, float | int) and isinstance(lon_deg, float | int):
        lat_r, lon_r = math.radians(lat_deg), math.radians(lon_deg)
        return np.array([math.cos(lat_r) * math.cos(lon_r), math.cos(lat_r) * math.sin(lon_r), math.sin(lat_r)])
    lat = np.radians(np.asarray(lat_deg, dtype=np.float64))
    lon = np.radians(np.asarray(lon_deg, dtype=np.float64))
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)], axis=-1)


def rtt_from_dot(dot: npt.ArrayLike) -> FloatArray:
    """Round-trip time (ms) between points whose unit vectors have this dot product."""
    # np.minimum / np.maximum in place: np.clip's dispatch costs more than the arithmetic
    # on the few dozen values of a shortlist, and the planner calls this per deployment
    angle = np.array(dot, dtype=np.float64)
    np.minimum(angle, 1.0, out=angle)
    np.maximum(angle, -1.0, out=angle)
    np.arccos(angle, out=angle)
    angle *= _MS_PER_RADIAN
    angle += FIXED_RTT_MS
    return angle


def rtt_ms(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Round-trip time (ms) between two coordinates by the haversine distance."""
    p1, l1, p2, l2 = map(np.radians, (lat1, lon1, lat2, lon2))
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    km = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(min(1.0, float(h))))
    return float(2.0 * km / FIBRE_KM_PER_MS + FIXED_RTT_MS)


def rtt_ms_many(lat: float, lon: float, lat_rad: FloatArray, lon_rad: FloatArray, cos_lat: FloatArray) -> FloatArray:
    """:func:`rtt_ms` from one coordinate to many, given in radians with their latitudes'
    cosines (computed once by a caller that asks often: the gateway, per request)."""
    p, lam = math.radians(lat), math.radians(lon)
    h = np.sin((lat_rad - p) / 2) ** 2 + math.cos(p) * cos_lat * np.sin((lon_rad - lam) / 2) ** 2
    np.minimum(h, 1.0, out=h)
    km = 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(h))
    return 2.0 * km / FIBRE_KM_PER_MS + FIXED_RTT_MS


def centroid(lat_deg: npt.ArrayLike, lon_deg: npt.ArrayLike) -> tuple[float, float]:
    """Spherical centroid (mean of unit vectors), correct across the antimeridian."""
    mean = unit_vectors(lat_deg, lon_deg).reshape(-1, 3).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-12:  # antipodal points: any answer is as good; take the first
        return float(np.ravel(lat_deg)[0]), float(np.ravel(lon_deg)[0])
    x, y, z = mean / norm
    return float(np.degrees(np.arcsin(z))), float(np.degrees(np.arctan2(y, x)))
