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

import redis
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, current_app, jsonify, render_template

import config
from api.auth import public

bp = Blueprint("openapi", __name__, static_folder="static", static_url_path="/docs/static", template_folder="templates")

OPENAPI_VERSION = "3.0.3"
OPERATION_ATTR = "_genqueue_openapi"
SKIPPED_METHODS = {"HEAD", "OPTIONS"}
JSON = "application/json"
SSE = "text/event-stream"
SECURITY_SCHEME = "bearerAuth"
# The order of /docs and of the document's tags: by task, what most callers do first.
TAG_ORDER = (
    "Jobs",
    "Batches",
    "OpenAI-compatible",
    "OpenAI-compatible batches",
    "Workers AI",
    "Health",
    "Operations",
    "Playground",
    "Documentation",
)
RESPONSE_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "Where the created resource is read", "schema": {"type": "string"}},
    "X-Job-Id": {
        "description": "The id of the job that runs the request (GET /v1/jobs/<id>)",
        "schema": {"type": "string"},
    },
    "Retry-After": {"description": "Seconds to wait before trying again", "schema": {"type": "integer"}},
    "X-Batch-Status": {"description": "The batch's status when the results were read", "schema": {"type": "string"}},
    "X-Batch-Ended": {"description": "How many requests had ended then", "schema": {"type": "integer"}},
}
# Request headers a submit route honours (its @document parameters).
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "A retried POST with the same key (and body) returns the job the first one created; "
    "another body with the same key is a 422.",
    "schema": {"type": "string"},
}

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
    request: type | Mapping[str, Any] | None = None,
    request_media: str = JSON,
    parameters: Iterable[dict] = (),
    headers: Mapping[int, Iterable[str]] | None = None,
    events: type | None = None,
    examples: Mapping[Any, Any] | None = None,
) -> Callable:
    """Describe a view's operation for the OpenAPI document. Path parameters come from the URL rule.

    request: a schema (sent as request_media), or {media type: schema} for a body of several kinds;
    headers: response headers by status (names from RESPONSE_HEADERS); events: the schema of each
    Server-Sent Event's data, for text/event-stream answers; examples: {"request": body, status: answer}.
    build_spec adds what every operation shares: the bearer scheme with 401/403 (unless public),
    Retry-After on 429 and 503, and the error shape of the route's surface where none is given."""

    def decorate(view: Callable) -> Callable:
        operation: dict[str, Any] = {"summary": summary, "responses": {}}
        if description:
            operation["description"] = description
        if tags:
            operation["tags"] = list(tags)
        if parameters:
            operation["parameters"] = list(parameters)
        if request is not None:
            bodies = request if isinstance(request, Mapping) else {request_media: request}
            content = {media: ({"schema": schema} if schema is not None else {}) for media, schema in bodies.items()}
            if examples and "request" in examples:
                next(iter(content.values()))["example"] = examples["request"]
            operation["requestBody"] = {"required": True, "content": content}
        for status, response in responses.items():
            text, schema, *media_types = (*response, None) if len(response) == 1 else response
            content = {JSON: {"schema": schema}} if schema is not None else {}
            for media_type in media_types:
                content[media_type] = {
                    "schema": event_stream_schema(events) if media_type == SSE else {"type": "string"}
                }
            if examples and status in examples and JSON in content:
                content[JSON]["example"] = examples[status]
            entry: dict[str, Any] = {"description": text, **({"content": content} if content else {})}
            names = list((headers or {}).get(status, ()))
            if names:
                entry["headers"] = {name: RESPONSE_HEADERS[name] for name in names}
            operation["responses"][str(status)] = entry
        setattr(view, OPERATION_ATTR, operation)
        return view

    return decorate


def event_stream_schema(events: type | None) -> dict:
    """A text/event-stream body: a string, whose events' data the schema named in x-event-data describes."""
    schema: dict[str, Any] = {"type": "string", "description": "Server-Sent Events, ending with data: [DONE]"}
    if events is not None:
        schema["x-event-data"] = {"$ref": f"#/components/schemas/{schema_name(events)}"}
        EVENT_SCHEMAS.add(events)
    return schema


def schema_name(schema: type) -> str:
    """The component name apispec gives a marshmallow schema class."""
    return schema.__name__.removesuffix("Schema") or schema.__name__


EVENT_SCHEMAS: set[type] = set()  # event data schemas, registered as components by build_spec


def _either_form(converter, field, **_kwargs) -> dict:
    """Fields that take two forms, documented as oneOf: a tool (api.schemas.ToolField: the flat form or
    {type: function, function}), a listed batch (native or OpenAI's shape), an OpenAI message's
    content (a string or text parts; null for an assistant turn that only makes tool calls)."""
    from api.openai.batches import OpenAIBatchObjectSchema
    from api.openai.protocol import MessageContent, TextPartSchema
    from api.schemas import AnyBatch, BatchSchema, FunctionToolSchema, ToolField, ToolSchema

    if isinstance(field, ToolField):
        return {
            "oneOf": [converter.resolve_nested_schema(ToolSchema), converter.resolve_nested_schema(FunctionToolSchema)]
        }
    if isinstance(field, AnyBatch):
        return {
            "oneOf": [
                converter.resolve_nested_schema(BatchSchema),
                converter.resolve_nested_schema(OpenAIBatchObjectSchema),
            ]
        }
    if isinstance(field, MessageContent):
        parts = {"type": "array", "items": converter.resolve_nested_schema(TextPartSchema)}
        return {"oneOf": [{"type": "string"}, parts], "nullable": True}
    return {}


def openapi_path(rule: str) -> str:
    """Flask's /v1/jobs/<job_id> (or <string:job_id>) as OpenAPI's /v1/jobs/{job_id}."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


def build_spec(app: Flask, max_context: int | None = None) -> dict:
    """The document of every route of the app; max_context, the served models' largest context when
    known, bounds max_tokens as the API does."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="genqueue",
        version=config.VERSION,
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": (
                "A self-hosted LLM generation queue. Errors are JSON: {error: {code, message, fields}} (the "
                "OpenAI-compatible endpoints use OpenAI's error shape, the Workers AI-compatible endpoint "
                "Cloudflare's envelope). With API keys configured, send Authorization: Bearer <key>."
            )
        },
        tags=[{"name": tag} for tag in TAG_ORDER],
        security=[{SECURITY_SCHEME: []}],
    )
    plugin.converter.add_attribute_function(_either_form)
    spec.components.security_scheme(
        SECURITY_SCHEME,
        {"type": "http", "scheme": "bearer", "description": "An API key (genqueue keys create), when keys are on."},
    )
    for events in sorted(EVENT_SCHEMAS, key=schema_name):
        spec.components.schema(schema_name(events), schema=events)
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
        operation = with_shared_responses(operation, rule.endpoint, getattr(view, "genqueue_public", False))
        path_parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in sorted(rule.arguments)
        ]
        for method in sorted(rule.methods - SKIPPED_METHODS):
            operation_id = rule.endpoint.rsplit(".", 1)[-1]
            while operation_id in operation_ids:  # one view under several rules (e.g. both Workers AI paths)
                operation_id += "_" + rule.rule.strip("/").split("/")[0]
            operation_ids.add(operation_id)
            entry = {**operation, "operationId": operation_id}
            if path_parameters:
                entry["parameters"] = path_parameters + list(operation.get("parameters", []))
            operations_by_path.setdefault(openapi_path(rule.rule), {})[method.lower()] = entry
    for path, operations in operations_by_path.items():
        spec.path(path=path, operations=operations)
    return with_limits(spec.to_dict(), max_context)


def with_shared_responses(operation: dict, endpoint: str, public: bool) -> dict:
    """The operation with what every one shares: the error shape of its surface on each error that
    names none, 401 and 403 unless it is public (then it needs no key), Retry-After on 429 and 503."""
    from api.openai.protocol import OpenAIErrorSchema
    from api.schemas import EnvelopeSchema, ErrorSchema

    surface = endpoint.split(".", 1)[0]
    error_schema = {"openai": OpenAIErrorSchema, "openai_files": OpenAIErrorSchema, "workers_ai": EnvelopeSchema}.get(
        surface, ErrorSchema
    )
    responses = {status: dict(response) for status, response in operation["responses"].items()}
    if public:
        operation = {**operation, "security": []}
    else:
        responses.setdefault("401", {"description": "No API key (when the server has keys)"})
        responses.setdefault("403", {"description": "A wrong API key"})
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400 and "content" not in response:
            response["content"] = {JSON: {"schema": error_schema}}
        if status in ("429", "503"):
            response["headers"] = {**response.get("headers", {}), "Retry-After": RESPONSE_HEADERS["Retry-After"]}
    return {**operation, "responses": responses}


# Request schemas the API refuses unknown fields of (OpenAI's are read leniently, then refused by name).
CLOSED_SCHEMAS = ("ChatCompletion", "Completion")
# The max_tokens of each request schema, bounded by the served model's context when it is known.
MAX_TOKENS_FIELDS = {
    "Generation": ("max_tokens",),
    "BatchItem": ("max_tokens",),
    "ChatCompletion": ("max_tokens", "max_completion_tokens"),
    "Completion": ("max_tokens",),
}


def nullable_refs(node: Any) -> Any:
    """apispec writes a nullable nested schema as anyOf [{type: object, nullable}, {$ref}], which
    generators read as an untyped object first; OpenAPI 3.0's own form is allOf [{$ref}] + nullable."""
    if isinstance(node, list):
        return [nullable_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: nullable_refs(value) for key, value in node.items()}
    choices = node.get("anyOf")
    if isinstance(choices, list) and len(choices) == 2 and choices[0] == {"type": "object", "nullable": True}:
        rest = {key: value for key, value in node.items() if key != "anyOf"}
        return {**rest, "allOf": [choices[1]], "nullable": True}
    return node


def with_limits(spec: dict, max_context: int | None) -> dict:
    """The document with its request schemas closed, and max_tokens bounded by max_context."""
    spec = nullable_refs(spec)
    schemas = spec.get("components", {}).get("schemas", {})
    for name in CLOSED_SCHEMAS:
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    for name, names in MAX_TOKENS_FIELDS.items():
        for field in names if max_context and name in schemas else ():
            prop = schemas[name]["properties"][field]
            prop["maximum"] = min(prop.get("maximum", max_context), max_context - 1)
            prop["description"] = (
                f"{prop.get('description', '')} The served model's context is {max_context} tokens: prompt "
                "plus max_tokens must fit (a 400 context_length_exceeded otherwise)."
            ).strip()
    return spec


def served_max_context(app: Flask) -> int | None:
    """The largest context of the models the default queue's workers serve; None if none is known."""
    from api.service import model_service

    try:
        served = model_service().served(app.config["DEFAULT_QUEUE"])
    except redis.RedisError:
        return None
    return max((model.max_context for model in served if model.max_context), default=None)


def spec_of(app: Flask) -> dict:
    """The app's document, built once per served context length (its routes do not change after start)."""
    max_context = served_max_context(app)
    documents = app.extensions.setdefault("genqueue.openapi", {})
    if max_context not in documents:
        documents[max_context] = build_spec(app, max_context)
    return documents[max_context]


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
    """The document reshaped for the template: operations by task (TAG_ORDER), in path order within
    one, then each schema's fields."""
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
                    "tag": (op.get("tags") or [""])[0],
                }
            )
    operations.sort(key=lambda op: TAG_ORDER.index(op["tag"]) if op["tag"] in TAG_ORDER else len(TAG_ORDER))
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
@public
@document(
    "This OpenAPI document",
    tags=["Documentation"],
    responses={200: ("The OpenAPI 3 document of every endpoint", {"type": "object"})},
)
def openapi_json():
    return jsonify(spec_of(current_app))


@bp.get("/docs")
@public
@document(
    "The API reference, rendered from the OpenAPI document",
    tags=["Documentation"],
    responses={200: ("An HTML page; its stylesheet is served from /docs/static", None, "text/html")},
)
def docs_page():
    return render_template("openapi/docs.html", page=page_model(spec_of(current_app)))
