"""The HTTP port against its own OpenAPI document: schemathesis (benchmarks/fuzz_http.py) sends what the document
allows and what it forbids to every route, over a bounded number of examples, and every check must pass: no 5xx;
status codes, content types, headers and bodies as documented; schema-valid input accepted and invalid input refused
(so the document and the service's rules cannot drift apart); requests without the key refused.

The engine here is the counting stand-in (tests/support/fakes.py): what is fuzzed is the HTTP layer, its parsing,
validation, refusals and answers, and a stand-in lets every accepted request finish in milliseconds. The same run
against `pixart serve` on a real export, with more examples, is `python -m benchmarks.fuzz_http --export DIR`.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from benchmarks.fuzz_http import OPEN_WEBHOOKS, fuzz
from tests.support.fakes import FakeEngine
from tests.support.servers import ServerThread, config

KEY = "fuzz-key-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cfg = config(tmp_path_factory.mktemp("store"), api_keys=[KEY], max_queue=10_000, webhook_allow=OPEN_WEBHOOKS,
                 webhook_attempts=1)
    srv = ServerThread(cfg, engine=FakeEngine())
    yield srv
    srv.close()


def test_the_document_covers_every_route_with_its_input_schema(server) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/openapi.json", timeout=10) as answer:
        document = json.load(answer)
    paths = set(document["paths"])
    served = {route.path.replace(":path}", "}") for route in server.app.http.app.routes}
    assert served - {"/openapi.json"} == paths
    fal_input = document["components"]["schemas"]["FalInput"]
    assert fal_input["required"] == ["prompt"]
    assert fal_input["properties"]["num_images"]["anyOf"][0]["maximum"] == 8


@pytest.mark.slow
def test_schemathesis_finds_no_failure_on_any_route(server) -> None:
    code, output = fuzz(f"http://127.0.0.1:{server.http_port}", key=KEY, max_examples=5, seed=7,
                        phases="examples,coverage,fuzzing")
    assert code == 0, output[-6000:]
    with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/openapi.json", timeout=10) as answer:
        operations = sum(len(methods) for methods in json.load(answer)["paths"].values())
    assert f"Tested: {operations}" in output  # every operation was reached
