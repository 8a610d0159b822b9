"""The playground page as HTML: its limits come from the schema, its assets are served and packaged.
(How it behaves in a browser is tests/browser/.)"""

import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

from marshmallow import validate

import api.playground
from api.schemas import GenerationSchema
from tests.conftest import REPO, TINY_DB, make_client


class Inputs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.inputs, self.assets = {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "input" and "data-param" in attrs:
            self.inputs[attrs["name"]] = attrs
        if tag in ("script", "link"):
            self.assets.append(attrs.get("src") or attrs.get("href"))


def page(client) -> Inputs:
    response = client.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    parsed = Inputs()
    parsed.feed(response.get_data(as_text=True))
    return parsed


def test_the_parameter_limits_are_the_schemas():
    parsed = page(make_client(TINY_DB))
    assert list(parsed.inputs) == ["max_tokens", "temperature", "top_p", "top_k", "seed"]
    schema = GenerationSchema().fields
    checked = 0
    for name, attrs in parsed.inputs.items():
        ranges = [v for v in schema[name].validators if isinstance(v, validate.Range)] if name in schema else []
        if ranges:
            assert float(attrs["min"]) == ranges[0].min and float(attrs["max"]) == ranges[0].max, name
            checked += 1
        else:
            assert "min" not in attrs and "max" not in attrs, name
    assert checked == 4
    assert parsed.inputs["max_tokens"]["placeholder"] == str(schema["max_tokens"].load_default)
    assert parsed.inputs["temperature"]["placeholder"] == str(schema["temperature"].load_default)
    assert parsed.inputs["temperature"]["step"] == "any" and parsed.inputs["top_k"]["step"] == "1"


def test_the_assets_are_served_from_the_app_and_nothing_from_elsewhere():
    client = make_client(TINY_DB)
    parsed = page(client)
    assert sorted(parsed.assets) == ["/playground/static/playground.css", "/playground/static/playground.js"]
    for asset in parsed.assets:
        assert client.get(asset).status_code == 200
    assert client.get("/playground/static/../__init__.py").status_code == 404
    assert client.get("/playground/static/missing.js").status_code == 404


def test_every_playground_file_ships_in_the_package():
    """The Docker image installs genqueue as a wheel: package-data must name every template and asset."""
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["api.playground"]
    root = Path(api.playground.__file__).parent
    files = [
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.suffix in (".html", ".css", ".js")
    ]
    assert len(files) == 3
    for path in files:
        assert any(fnmatch(path, pattern) for pattern in patterns), path
