"""The playground page as HTML: its limits come from the schema, its assets are served and packaged.
(How it behaves in a browser is tests/browser/.)"""

import tomllib
from fnmatch import fnmatch
from html.parser import HTMLParser
from pathlib import Path

import api.playground
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


def test_the_parameters_offered_are_those_the_api_honours_with_its_limits(client):
    """Pinned: the ranges GenerationSchema enforces, max_tokens bounded by the served (tiny, 512-token)
    model's context, the native defaults as placeholders; seed is not offered (the API refuses it)."""
    parsed = page(client)
    assert list(parsed.inputs) == ["max_tokens", "temperature", "top_p", "top_k"]
    limits = {name: (float(attrs["min"]), float(attrs["max"])) for name, attrs in parsed.inputs.items()}
    assert limits == {"max_tokens": (1, 512), "temperature": (0, 5), "top_p": (0, 2), "top_k": (1, 50)}
    assert parsed.inputs["max_tokens"]["placeholder"] == "256"
    assert parsed.inputs["temperature"]["placeholder"] == "0.6"
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
