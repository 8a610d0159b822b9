"""The playground: a chat page at `/` that streams answers from the jobs API in the browser.

Plain HTML, CSS and JavaScript served by the app (no CDN, no build step). The parameter limits are
rendered from GenerationSchema's validators, so the page never disagrees with the API about them;
the API stays the one validator and the page shows its errors next to the fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import Blueprint, render_template, send_from_directory
from marshmallow import fields, missing, validate

from api.auth import public
from api.schemas import GenerationSchema
from engine.request import SamplingOptions

STATIC_DIR = Path(__file__).parent / "static"

bp = Blueprint("playground", __name__, template_folder="templates")

# The sampling fields the page offers, in the order it shows them. A field the schema does not
# know (seed, today) is still offered: the API's refusal then shows next to it.
NUMBER_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed")
HELP = {
    "max_tokens": "Most tokens to generate; the prompt and these must fit the model's context.",
    "temperature": "0 is greedy; higher is more varied.",
    "top_p": "Sample from the likeliest tokens up to this probability mass; 0 is greedy, 1 and above cut nothing.",
    "top_k": "Sample from the k likeliest tokens; 1 is greedy.",
    "seed": "Repeatable sampling; sent only when filled in.",
}
EMPTY_MEANS = {"top_k": "no limit", "seed": "no seed"}  # fields whose default is None


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


def number_fields() -> list[NumberField]:
    """Each offered number field with the range and default the API applies to it."""
    schema_fields = GenerationSchema().fields
    engine_defaults = SamplingOptions()
    offered = []
    for name in NUMBER_FIELDS:
        field = schema_fields.get(name)
        ranges = [v for v in (field.validators if field else []) if isinstance(v, validate.Range)]
        default = field.load_default if field is not None else missing
        if default is missing:
            default = getattr(engine_defaults, name, None)
        offered.append(
            NumberField(
                name=name,
                integer=field is None or isinstance(field, fields.Integer),
                minimum=ranges[0].min if ranges else None,
                maximum=ranges[0].max if ranges else None,
                default=EMPTY_MEANS.get(name, "none") if default is None else _number(default),
                help=HELP[name],
            )
        )
    return offered


@bp.get("/")
@public
def index():
    return render_template("playground/index.html", number_fields=number_fields())


@bp.get("/playground/static/<path:filename>")
@public
def asset(filename: str):
    """The page's CSS and JavaScript; public like the page, so it loads before a key is typed."""
    return send_from_directory(STATIC_DIR, filename)
