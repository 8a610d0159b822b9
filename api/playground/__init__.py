"""The playground: a chat page at `/` that streams answers from the jobs API in the browser.

Plain HTML, CSS and JavaScript served by the app (no CDN, no build step). The parameter limits are
rendered from GenerationSchema's validators, so the page never disagrees with the API about them;
the API stays the one validator and the page shows its errors next to the fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, current_app, render_template, send_from_directory
from marshmallow import fields, validate

from api.auth import public
from api.generation import Surface, default_of
from api.openapi import document
from api.schemas import ErrorSchema, GenerationSchema
from api.service import model_service

STATIC_DIR = Path(__file__).parent / "static"

bp = Blueprint("playground", __name__, template_folder="templates")

# The sampling fields the page offers, in the order it shows them (only fields the API honours).
NUMBER_FIELDS = ("max_tokens", "temperature", "top_p", "top_k")
HELP = {
    "max_tokens": "Most tokens to generate; the prompt and these must fit the model's context.",
    "temperature": "0 is greedy; higher is more varied.",
    "top_p": "Sample from the likeliest tokens up to this probability mass; 0 is greedy, 1 and above cut nothing.",
    "top_k": "Sample from the k likeliest tokens; 1 is greedy.",
}
EMPTY_MEANS = {"top_k": "no limit"}  # fields whose default is None


@dataclass(frozen=True)
class NumberField:
    name: str
    integer: bool
    minimum: float | None
    maximum: float | None
    default: str  # what the server uses when the field is left empty, for the placeholder
    help: str

    @property
    def limits(self) -> str:
        if self.minimum is not None and self.maximum is not None:
            return f"{_number(self.minimum)} to {_number(self.maximum)}"
        if self.minimum is not None:
            return f"at least {_number(self.minimum)}"
        if self.maximum is not None:
            return f"at most {_number(self.maximum)}"
        return "integer" if self.integer else "number"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def number_fields(max_context: int | None = None) -> list[NumberField]:
    """Each offered number field with the range and default the API applies to it; max_tokens is
    bounded by the served model's context when a worker has announced it."""
    schema_fields = GenerationSchema().fields
    offered = []
    for name in NUMBER_FIELDS:
        field = schema_fields[name]
        ranges = [v for v in field.validators if isinstance(v, validate.Range)]
        maximum = ranges[0].max if ranges else None
        if name == "max_tokens" and max_context and maximum is not None:
            maximum = min(maximum, max_context)
        default = default_of(Surface.NATIVE, name)
        offered.append(
            NumberField(
                name=name,
                integer=isinstance(field, fields.Integer),
                minimum=ranges[0].min if ranges else None,
                maximum=maximum,
                default=EMPTY_MEANS.get(name, "none") if default is None else _number(default),
                help=HELP[name],
            )
        )
    return offered


@bp.get("/")
@public
@document("The playground page", tags=["Playground"], responses={200: ("The page", None, "text/html")})
def index():
    served = model_service().served(current_app.config["DEFAULT_QUEUE"])
    max_context = max((m.max_context for m in served if m.max_context), default=None)
    return render_template("playground/index.html", number_fields=number_fields(max_context))


@bp.get("/playground/static/<path:filename>")
@public
@document(
    "The playground's CSS and JavaScript",
    tags=["Playground"],
    responses={200: ("The file", None, "text/css", "text/javascript"), 404: ("No such file", ErrorSchema)},
)
def asset(filename: str):
    """The page's CSS and JavaScript; public like the page, so it loads before a key is typed."""
    return send_from_directory(STATIC_DIR, filename)
