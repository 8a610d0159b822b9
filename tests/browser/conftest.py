"""Real headless Chromium (Debian's package, driven by Playwright) against the real app on a loopback
port, whose jobs run on the SmolLM2 worker. Screenshots go to artifacts/playground/."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask import Flask
from werkzeug.serving import make_server

from tests.conftest import REPO, SMOL_DB, redis_url

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "artifacts" / "playground"
ACTION_TIMEOUT_MS = 30_000


@dataclass
class Served:
    url: str
    app: Flask

    def job(self, job_id: str, headers: dict | None = None) -> dict:
        response = self.app.test_client().get(f"/v1/jobs/{job_id}?wait=60", headers=headers or {})
        assert response.status_code == 200, response.json
        return response.json


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser tests need Playwright for Python (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM} (.ci/run installs it)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@contextmanager
def serve(app: Flask) -> Iterator[str]:
    """The app under werkzeug's threaded server on a free loopback port (each SSE stream holds a thread)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def make_app(**config) -> Flask:
    from api import create_app

    return create_app({"REDIS_URL": redis_url(SMOL_DB), **config})


@pytest.fixture(scope="module")
def playground(smol_worker) -> Iterator[Served]:
    app = make_app()
    with serve(app) as url:
        yield Served(url, app)


@pytest.fixture
def open_page(browser):
    """Opens the playground in a fresh browser context; the test fails on any uncaught script error."""
    contexts, errors = [], []

    def open_(served: Served, **context_options):
        context = browser.new_context(**context_options)
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(served.url + "/")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"
