"""Schemathesis against the served OpenAPI document: no 5xx, responses match their schemas.

Hypothesis drives each operation's strategy directly (schemathesis' pytest plugin does not load
under pytest 9).
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

ROUTES = ["/segment", "/detect", "/render", "/segment_batch", "/models", "/encode"]


@pytest.fixture(scope="module")
def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/docs.json")
    found = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        found[operation.path] = operation
    return found


@pytest.mark.parametrize("route", ROUTES)
def test_no_server_errors_and_schema_conformance(operations, server, route):
    operation = operations[route]

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def fuzz(case):
        case.call_and_validate(base_url=server.url, checks=[not_a_server_error, response_schema_conformance],
                               timeout=60)

    fuzz()
