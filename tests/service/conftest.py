"""A real `bentoml serve` on 127.0.0.1 with the tiny fixtures, shared by the service tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import import_fixtures, kill_tree, start_server


@pytest.fixture(scope="session")
def server_home(tmp_path_factory, tiny_fixtures) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    import_fixtures(home, tiny_fixtures)
    return home


@pytest.fixture(scope="session")
def server(server_home):
    srv = start_server(server_home, {"SEG_URL_ALLOWLIST": "localhost"})
    yield srv
    kill_tree(srv.process.pid)

