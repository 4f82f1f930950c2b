"""The OpenAPI document: every route of the app is in it and nothing else, and it is valid 3.1."""

from __future__ import annotations

import json

from api.app import create_app
from api.openapi import OPERATIONS, document, routes_of
from streams.settings import Settings


def _app_routes() -> set[tuple[str, str]]:
    settings = Settings(database_url="postgresql://unused/x", kafka_bootstrap_servers="unused:9092")
    return routes_of(create_app(settings))


def test_every_route_is_documented_and_every_operation_is_a_route() -> None:
    served = _app_routes()
    documented = set(OPERATIONS)
    assert served - documented == set(), "routes without an entry in api/openapi.OPERATIONS"
    assert documented - served == set(), "entries in api/openapi.OPERATIONS that are not routes"


def test_the_document_is_openapi_3_1_with_resolvable_references() -> None:
    spec = document()
    assert spec["openapi"] == "3.1.0"
    text = json.dumps(spec)
    schemas = spec["components"]["schemas"]
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in schemas, ref
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            assert op["responses"], (method, path)
            if path.startswith("/v1/"):
                assert "401" in op["responses"] and op["security"] == [{"admin": []}], (method, path)
            params = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert params == {s[1:-1] for s in path.split("/") if s.startswith("{")}, (method, path)


def test_request_bodies_are_the_handlers_models() -> None:
    spec = document()
    put = spec["paths"]["/v1/schedules/{key}"]["put"]["requestBody"]["content"]["application/json"]
    assert put["schema"] == {"$ref": "#/components/schemas/ScheduleIn"}
    schedule_in = spec["components"]["schemas"]["ScheduleIn"]
    assert schedule_in["additionalProperties"] is False and "event_type" in schedule_in["required"]
