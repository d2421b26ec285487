"""Filters on the catalogue side of a match: only photos from a place, a time span or near a point (predict, submit, serve)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from whalefast.core.errors import WhalefastError
from whalefast.db.darwin_core import COLUMNS

EARTH_KM = 6371.0088  # the mean Earth radius
_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?")


def distance_km(lat1, lon1, lat2, lon2) -> float | None:
    """Great-circle distance by the haversine formula (None where a point is missing)."""
    if None in (lat1, lon1, lat2, lon2):
        return None
    p1, p2, dl = math.radians(lat1), math.radians(lat2), math.radians(lon2 - lon1)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_KM * math.asin(min(1.0, math.sqrt(a)))


@dataclass(frozen=True)
class PhotoFilter:
    """Which catalogue photos a match may propose: `where` (Darwin Core term or column -> exact value), dates, and a circle."""

    where: dict[str, str] = field(default_factory=dict)
    since: str = ""
    until: str = ""
    near: tuple[float, float] | None = None
    within_km: float | None = None

    def __post_init__(self):
        for key in self.where:
            if key not in COLUMNS and key not in COLUMNS.values() and key != "source":
                raise WhalefastError(f"--where {key}=...: not a catalogue field; choose one of {', '.join([*COLUMNS, 'source'])}")
        for option, value in (("--since", self.since), ("--until", self.until)):
            if value and not _DATE.fullmatch(value):
                raise WhalefastError(f"{option} must be a date such as 2019-07-14 (or 2019-07, 2019), got {value!r}")
        if (self.near is None) != (self.within_km is None):
            raise WhalefastError("--near LAT,LON and --within-km KM go together")
        if self.near is not None:
            lat, lon = self.near
            if not (-90 <= lat <= 90 and -180 <= lon <= 180):
                raise WhalefastError(f"--near must be LAT,LON in degrees (-90..90, -180..180), got {lat},{lon}")
            if not self.within_km > 0:
                raise WhalefastError(f"--within-km must be a positive number of kilometres, got {self.within_km}")

    @property
    def active(self) -> bool:
        return bool(self.where or self.since or self.until or self.near)

    def sql(self) -> tuple[str, list]:
        """A WHERE clause on the photos table (photos dated inside, at the place, within the circle) and its parameters."""
        clauses, params = [], []
        for key, value in self.where.items():
            clauses.append(f"{COLUMNS.get(key, key)} = ?")
            params.append(value)
        if self.since:
            clauses.append("event_date != '' AND substr(event_date, 1, 10) >= ?")
            params.append(self.since)
        if self.until:
            clauses.append("event_date != '' AND substr(event_date, 1, ?) <= ?")
            params += [len(self.until), self.until]
        if self.near is not None:
            clauses.append("distance_km(latitude, longitude, ?, ?) <= ?")
            params += [*self.near, self.within_km]
        return (" AND ".join(clauses) or "1"), params

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.where.items()]
        parts += [f"since {self.since}"] * bool(self.since) + [f"until {self.until}"] * bool(self.until)
        if self.near is not None:
            parts.append(f"within {self.within_km:g} km of {self.near[0]:g},{self.near[1]:g}")
        return ", ".join(parts) or "all photos"


def parse_filter(where: list[str] | None = None, since: str = "", until: str = "", near: str = "", within_km: float | None = None) -> PhotoFilter:
    """A PhotoFilter from the command line's --where KEY=VALUE (repeatable), --since, --until, --near LAT,LON and --within-km."""
    pairs = {}
    for item in where or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise WhalefastError(f"--where must be KEY=VALUE (e.g. locality=Husavik), got {item!r}")
        pairs[key.strip()] = value.strip()
    point = None
    if near:
        try:
            lat, lon = (float(v) for v in near.split(","))
        except ValueError:
            raise WhalefastError(f"--near must be LAT,LON in degrees, e.g. 66.05,-17.35, got {near!r}") from None
        point = (lat, lon)
    return PhotoFilter(pairs, since.strip(), until.strip(), point, within_km)
