"""`maskcls serve`'s API against its own OpenAPI schema (issue 29): schemathesis, a fuzzer for web APIs,
draws requests from /openapi.json (the multipart body of /predict included, and bodies that break it)
and sends them to a real server; every answer must be documented, JSON, and no 5xx. A real photo's
answer must match the schema too (random bytes never decode, so the fuzzer alone only meets 4xx)."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402 (after the skip: hypothesis comes with schemathesis)

from tests.conftest import SAMPLES  # noqa: E402
from tests.test_deploy import sample_model, server  # noqa: E402, F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def api(server):  # noqa: F811
    url, _ = server
    return schemathesis.openapi.from_url(url + "/openapi.json")


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_the_schema_allows_or_breaks_gets_a_5xx_or_an_undocumented_answer(api, mode):
    """Every operation, with requests drawn to fit the schema (positive) and to break it (negative).
    (schemathesis's own pytest plugin does not load under pytest 9: the strategies are driven here.)"""
    from hypothesis import given
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                                   status_code_conformance)

    operations = [r.ok() for r in api.get_all_operations()]
    assert {op.label for op in operations} == {"GET /health", "POST /predict"}
    seen = set()
    for op in operations:
        if mode == "negative" and op.label == "GET /health":
            continue  # a GET without parameters has no request that breaks its schema
        @given(case=op.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case):
            response = case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                                      content_type_conformance, response_schema_conformance])
            seen.add((op.label, response.status_code))
            if response.status_code >= 400:
                assert set(response.json()) == {"error"} and response.json()["error"]

        run()
    print(sorted(seen))
    assert any(label == "POST /predict" and status >= 400 for label, status in seen), seen


def test_the_schema_describes_the_upload_and_a_real_answer_conforms(api, server):  # noqa: F811
    import httpx
    import jsonschema

    url, want = server
    body = api.raw_schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["file"] and body["properties"]["file"]["items"]["format"] == "binary"
    assert body["properties"]["file"]["maxItems"] == 4  # the server's --max-files
    photo = sorted((SAMPLES / "eval" / "images").iterdir())[0]
    r = httpx.post(url + "/predict", files=[("file", (photo.name, photo.read_bytes()))], timeout=60)
    assert r.status_code == 200
    spec = api.raw_schema
    ok = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(r.json(), {**ok, "components": spec["components"]})
    broken = r.json() | {"predictions": [r.json()["predictions"][0] | {"class": 18}]}  # the check can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, {**ok, "components": spec["components"]})
