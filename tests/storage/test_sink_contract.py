"""roomrouter's own sinks through the shipped conformance suite
(:class:`roomrouter.testing.SinkContract`), each built from its URL through the entry-point
registry: SQLite (a file per test), PostgreSQL and MariaDB (a table prefix per test, dropped
afterwards). A server that is not reachable skips its class (fails it under ``CI``), as for
the rest of tests/storage/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from roomrouter.testing import SinkContract

from .conftest import MYSQL_URL, PG_DSN


class TestSQLiteContract(SinkContract):
    @pytest.fixture(autouse=True)
    def _file(self, tmp_path: Path) -> None:
        self.path = tmp_path / "contract.db"

    @property
    def sink_url(self) -> str:  # type: ignore[override]
        return f"sqlite:///{self.path}"  # an absolute path: four slashes


class TestSQLiteInMemoryContract(SinkContract):
    sink_url = "sqlite://:memory:"
    durable = False  # each sink has a database of its own


class TestPostgresContract(SinkContract):
    @pytest.fixture(autouse=True)
    def _prefix(self, pg_prefix: str) -> Iterator[None]:
        self.prefix = pg_prefix  # the fixture drops the tables afterwards
        yield

    @property
    def sink_url(self) -> str:  # type: ignore[override]
        return f"{PG_DSN}?table_prefix={self.prefix}"


class TestMySQLContract(SinkContract):
    @pytest.fixture(autouse=True)
    def _prefix(self, mysql_prefix: str) -> Iterator[None]:
        self.prefix = mysql_prefix
        yield

    @property
    def sink_url(self) -> str:  # type: ignore[override]
        return f"{MYSQL_URL}?table_prefix={self.prefix}"
