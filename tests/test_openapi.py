"""The OpenAPI description, checked against the real server by schemathesis.

Every operation of /openapi.json gets generated requests (valid and invalid); each response must
be no server error and must match the document: status code, content type, headers and schema.
"""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from .conftest import Server

pytestmark = pytest.mark.frontend

EXAMPLES = 40

schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")

# Interdependencies (exactly one of Upload-Length and Upload-Defer-Length; an Upload-Offset that
# must equal the upload's offset; one `sha256` field per `file`; at least one of `sessionID` and
# `sessionIDs`) cannot be written in OpenAPI, so a "schema-valid" request may rightly be refused:
# positive data acceptance is not checked there.
HEADER_RULES = {"POST /files/", "PATCH /files/{upload_id}", "POST /upload", "GET /upload/status"}
# Invalid input must be refused with a 4xx. schemathesis's own negative check expects a fixed list
# of statuses that leaves out 412, which tus requires for a missing or wrong Tus-Resumable.
NO_INVALID_FORM = {
    "GET /healthz",
    "GET /readyz",
    "GET /openapi.json",
    "GET /metrics",
    "OPTIONS /files/",
    "OPTIONS /files/{upload_id}",
    "GET /upload/status",  # any query string is a list of ids, found or not
    "POST /upload",
    "POST /upload/resume",
}  # multipart: see tests/test_fuzz.py


def refused_as_client_error(ctx, response, case) -> None:
    if not 400 <= response.status_code < 500:
        raise AssertionError(f"invalid request answered {response.status_code}: {response.text}")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("openapi") / "uploads").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_url(api.url("/openapi.json"))


def _operations() -> list[str]:
    from upload_server.api.openapi import document
    from upload_server.config import Config

    paths = document(Config.load(environ={}))["paths"]
    methods = {"get", "put", "post", "delete", "options", "head", "patch"}
    return [f"{m.upper()} {p}" for p, item in paths.items() for m in item if m in methods]


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"]
)
@pytest.mark.parametrize("label", _operations())
def test_the_server_does_what_its_openapi_says(api, api_schema, label, mode):
    method, path = label.split(" ", 1)
    operation = api_schema[path][method]
    if mode == GenerationMode.NEGATIVE:
        if label in NO_INVALID_FORM:
            pytest.skip("no invalid form of this request to generate")
        excluded = [schemathesis.checks.negative_data_rejection]
        extra = [refused_as_client_error]
    else:
        excluded = [schemathesis.checks.positive_data_acceptance] if label in HEADER_RULES else []
        extra = []

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case):
        case.call_and_validate(base_url=api.base, excluded_checks=excluded, additional_checks=extra)

    check()


def test_openapi_document_is_served(api):
    document = requests.get(api.url("/openapi.json"), timeout=10).json()
    assert document["openapi"].startswith("3.")
    assert {
        "/upload",
        "/upload/status",
        "/upload/pause",
        "/upload/resume",
        "/upload/terminate",
        "/files/",
        "/files/{upload_id}",
    } <= set(document["paths"])
