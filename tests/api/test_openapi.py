"""GET /openapi.json covers every endpoint from the marshmallow schemas; /docs renders it locally."""

import html as html_lib
import re

from openapi_spec_validator import validate

from api import create_app
from api.openapi import openapi_path
from api.schemas import GenerationSchema
from tests.conftest import STORE_DB, redis_url


def app_and_spec():
    app = create_app({"TESTING": True, "REDIS_URL": redis_url(STORE_DB)})
    response = app.test_client().get("/openapi.json")
    assert response.status_code == 200
    return app, response.json


def test_the_document_is_valid_openapi_3():
    _app, spec = app_and_spec()
    validate(spec)
    assert spec["openapi"].startswith("3.")


def test_every_route_of_the_app_is_documented():
    app, spec = app_and_spec()
    routes = [r for r in app.url_map.iter_rules() if not r.endpoint.endswith("static")]
    assert len(routes) >= 9
    for rule in routes:
        operations = spec["paths"][openapi_path(rule.rule)]
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = operations[method.lower()]
            assert not operation.get("x-undocumented"), f"{method} {rule.rule} lacks @document"
            assert operation["summary"] and operation["responses"]


def test_the_request_body_is_the_generation_schema_with_every_field():
    _app, spec = app_and_spec()
    for path in ("/v1/jobs", "/ai/run/{model}"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/Generation"}
    generation = spec["components"]["schemas"]["Generation"]["properties"]
    assert set(generation) == set(GenerationSchema().fields)
    assert generation["top_k"]["minimum"] == 1 and generation["top_k"]["maximum"] == 50
    assert generation["seed"]["maximum"] == 9999999999 and "not supported" in generation["seed"]["description"]
    assert [s["$ref"] for s in generation["tools"]["items"]["oneOf"]] == [
        "#/components/schemas/Tool",
        "#/components/schemas/FunctionTool",
    ]
    account = spec["paths"]["/client/v4/accounts/{account_id}/ai/run/{model}"]["post"]
    assert [p["name"] for p in account["parameters"]] == ["account_id", "model", "Idempotency-Key"]


def test_the_docs_page_renders_every_endpoint_and_field_with_local_assets_only():
    app, spec = app_and_spec()
    client = app.test_client()
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = html_lib.unescape(page.get_data(as_text=True))
    for path, operations in spec["paths"].items():
        assert f"<code>{path}</code>" in html
        for operation in operations.values():
            assert operation["summary"] in html
    for field in GenerationSchema().fields:
        assert f"<code>{field}</code>" in html
    assets = re.findall(r'(?:src|href)="([^"#]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets  # nothing from another host
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert "http://" not in html and "https://" not in html


def test_the_docs_page_lists_endpoints_by_task_jobs_first():
    app, _spec = app_and_spec()
    html = html_lib.unescape(app.test_client().get("/docs").get_data(as_text=True))
    nav = html.split("<nav>", 1)[1].split("</nav>", 1)[0]
    paths = re.findall(r"<code>([^<]+)</code>", nav)
    assert paths[0].startswith("/v1/jobs")
    order = [
        paths.index(p)
        for p in (
            "/v1/jobs",
            "/v1/batches",
            "/v1/chat/completions",
            "/v1/files",
            "/ai/run/{model}",
            "/healthz",
            "/docs",
        )
    ]
    assert order == sorted(order), paths
