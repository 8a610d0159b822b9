"""The OpenAPI document, generated from the marshmallow schemas, and a docs page rendered from it.

A view declares its operation with `@document(...)` (summary, request schema, responses by status);
`build_spec` walks the app's URL rules, so a blueprint's endpoints join the document as soon as its
views are decorated, whatever module they live in. A route without `@document` still appears, with
its docstring and `x-undocumented: true`, and the test suite refuses those.

The docs page (`/docs`) is rendered on the server from the same document: plain HTML and one local
stylesheet, nothing fetched from elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, jsonify, render_template

import genqueue

bp = Blueprint("openapi", __name__, static_folder="static", static_url_path="/docs/static", template_folder="templates")

OPENAPI_VERSION = "3.0.3"
OPERATION_ATTR = "_genqueue_openapi"
SKIPPED_METHODS = {"HEAD", "OPTIONS"}
JSON = "application/json"

# A response: (description,), (description, schema) or (description, schema, other media type, ...).
# The schema (a marshmallow Schema class, or None) describes the JSON body; other media types
# (text/event-stream) are documented as strings.
ResponseSpec = tuple


def document(
    summary: str,
    *,
    responses: Mapping[int, ResponseSpec],
    description: str | None = None,
    tags: Iterable[str] = (),
    request: type | None = None,
    parameters: Iterable[dict] = (),
) -> Callable:
    """Describe a view's operation for the OpenAPI document. Path parameters come from the URL rule."""

    def decorate(view: Callable) -> Callable:
        operation: dict[str, Any] = {"summary": summary, "responses": {}}
        if description:
            operation["description"] = description
        if tags:
            operation["tags"] = list(tags)
        if parameters:
            operation["parameters"] = list(parameters)
        if request is not None:
            operation["requestBody"] = {"required": True, "content": {JSON: {"schema": request}}}
        for status, response in responses.items():
            text, schema, *media_types = (*response, None) if len(response) == 1 else response
            content = {JSON: {"schema": schema}} if schema is not None else {}
            for media_type in media_types:
                content[media_type] = {"schema": {"type": "string"}}
            operation["responses"][str(status)] = {"description": text, **({"content": content} if content else {})}
        setattr(view, OPERATION_ATTR, operation)
        return view

    return decorate


def _tool_field_as_one_of(converter, field, **_kwargs) -> dict:
    """api.schemas.ToolField takes either tool form: document it as oneOf the two schemas."""
    from api.schemas import FunctionToolSchema, ToolField, ToolSchema

    if not isinstance(field, ToolField):
        return {}
    return {"oneOf": [converter.resolve_nested_schema(ToolSchema), converter.resolve_nested_schema(FunctionToolSchema)]}


def openapi_path(rule: str) -> str:
    """Flask's /v1/jobs/<job_id> (or <string:job_id>) as OpenAPI's /v1/jobs/{job_id}."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def build_spec(app: Flask) -> dict:
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="genqueue",
        version=genqueue.__version__,
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": (
                "A self-hosted LLM generation queue. Errors are JSON: {error: {code, message, fields}} "
                "(the Workers AI-compatible endpoint uses Cloudflare's envelope instead)."
            )
        },
    )
    plugin.converter.add_attribute_function(_tool_field_as_one_of)
    operations_by_path: dict[str, dict] = {}
    operation_ids: set[str] = set()
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static" or rule.endpoint.endswith(".static"):
            continue
        view = app.view_functions[rule.endpoint]
        operation = getattr(view, OPERATION_ATTR, None)
        if operation is None:
            summary = (view.__doc__ or rule.endpoint).strip().splitlines()[0]
            operation = {"summary": summary, "responses": {"default": {"description": "see the README"}}}
            operation["x-undocumented"] = True
        path_parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in sorted(rule.arguments)
        ]
        for method in sorted(rule.methods - SKIPPED_METHODS):
            operation_id = f"{rule.endpoint.replace('.', '_')}_{method.lower()}"
            while operation_id in operation_ids:  # one view under several rules (e.g. both Workers AI paths)
                operation_id += "_"
            operation_ids.add(operation_id)
            entry = {**operation, "operationId": operation_id}
            if path_parameters:
                entry["parameters"] = path_parameters + list(operation.get("parameters", []))
            operations_by_path.setdefault(openapi_path(rule.rule), {})[method.lower()] = entry
    for path, operations in operations_by_path.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()


def spec_of(app: Flask) -> dict:
    """The app's document, built once (its routes do not change after start)."""
    if "genqueue.openapi" not in app.extensions:
        app.extensions["genqueue.openapi"] = build_spec(app)
    return app.extensions["genqueue.openapi"]


# -- the docs page ------------------------------------------------------------------------------


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_label(schema: Mapping[str, Any]) -> dict:
    """How a property's type reads on the page: text and, for a schema, the anchor to link."""
    if "$ref" in schema:
        return {"text": _ref_name(schema["$ref"]), "link": _ref_name(schema["$ref"])}
    if "oneOf" in schema or "allOf" in schema:
        parts = [type_label(s) for s in schema.get("oneOf") or schema.get("allOf")]
        return {"text": " or ".join(p["text"] for p in parts), "links": [p.get("link") for p in parts]}
    if schema.get("type") == "array":
        inner = type_label(schema.get("items", {}))
        return {**inner, "text": f"array of {inner['text']}"}
    if schema.get("type") == "object" and isinstance(schema.get("additionalProperties"), dict):
        inner = type_label(schema["additionalProperties"])
        return {**inner, "text": f"object of {inner['text']}"}
    return {"text": schema.get("type") or "any"}


def limits(schema: Mapping[str, Any]) -> str:
    words = []
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minItems", "items ≥"),
    ):
        if key in schema:
            words.append(f"{label} {schema[key]}")
    if "enum" in schema:
        words.append("one of " + ", ".join(map(str, schema["enum"])))
    if "default" in schema:
        words.append(f"default {schema['default']}")
    if schema.get("nullable"):
        words.append("may be null")
    return "; ".join(words)


def page_model(spec: Mapping[str, Any]) -> dict:
    """The document reshaped for the template: operations in path order, then each schema's fields."""
    operations = []
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get(JSON, {}).get("schema")
            operations.append(
                {
                    "method": method.upper(),
                    "path": path,
                    "summary": op.get("summary", ""),
                    "description": op.get("description", ""),
                    "parameters": [
                        {
                            "name": p["name"],
                            "in": p["in"],
                            "required": p.get("required", False),
                            "description": p.get("description", ""),
                        }
                        for p in op.get("parameters", [])
                    ],
                    "request": type_label(body) if body else None,
                    "responses": [
                        {
                            "status": status,
                            "description": response.get("description", ""),
                            "media": [
                                {"type": media, **type_label(content.get("schema", {}))}
                                for media, content in response.get("content", {}).items()
                            ],
                        }
                        for status, response in op["responses"].items()
                    ],
                    "undocumented": op.get("x-undocumented", False),
                }
            )
    schemas = []
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        required = set(schema.get("required", []))
        schemas.append(
            {
                "name": name,
                "description": schema.get("description", ""),
                "fields": [
                    {
                        "name": field,
                        "type": type_label(prop),
                        "required": field in required,
                        "limits": limits(prop),
                        "description": prop.get("description", ""),
                    }
                    for field, prop in schema.get("properties", {}).items()
                ],
            }
        )
    return {"info": spec["info"], "operations": operations, "schemas": schemas}


@bp.get("/openapi.json")
@document(
    "This OpenAPI document", tags=["Documentation"], responses={200: ("The OpenAPI 3 document of every endpoint",)}
)
def openapi_json():
    return jsonify(spec_of(current_app))


@bp.get("/docs")
@document(
    "The API reference, rendered from the OpenAPI document",
    tags=["Documentation"],
    responses={200: ("An HTML page; its stylesheet is served from /docs/static", None, "text/html")},
)
def docs_page():
    return render_template("openapi/docs.html", page=page_model(spec_of(current_app)))
