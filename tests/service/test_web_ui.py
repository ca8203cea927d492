"""The try-it page's HTTP side: its files and security headers, its relative URLs, FLOWIE_WEB_UI=false.

The page itself runs in a real browser in test_web_ui_browser.py.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

KEY = "web-ui-key-0123456789abcdef"
PAGE_FILES = {"/": "text/html", "/web/app.js": "text/javascript", "/web/app.css": "text/css"}


class Tags(HTMLParser):
    """Every start tag of a document with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data


@pytest.fixture(scope="module")
def keyed_client(make_app):
    """A service with an API key configured and no worker (the page's files need none)."""
    with TestClient(make_app(worker=False, api_keys=KEY)) as client:
        yield client


def _directives(policy: str) -> dict[str, str]:
    return {part.split()[0]: " ".join(part.split()[1:]) for part in policy.split(";") if part.strip()}


@pytest.mark.parametrize("path", list(PAGE_FILES))
def test_the_page_files_are_served_without_a_key_and_with_the_security_headers(keyed_client, path):
    response = keyed_client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].split(";")[0] == PAGE_FILES[path]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    policy = _directives(response.headers["content-security-policy"])
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"  # no inline script, no eval
    assert policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self' blob:"  # the result and the input are shown from blob: URLs
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"


def test_the_page_needs_no_inline_script_or_style_and_loads_only_relative_urls(keyed_client):
    page = Tags()
    page.feed(keyed_client.get("/").text)
    assert not page.script_text.strip()  # every script comes from a file
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert scripts and all(attrs.get("src") for attrs in scripts)
    for tag, attrs in page.tags:
        assert "style" not in attrs, tag
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        for name in ("src", "href"):
            url = attrs.get(name)
            if url:
                # relative to the page: works behind a proxy that mounts the service under a path, and offline
                assert not url.startswith(("/", "http:", "https:", "//")), (tag, url)
    script = keyed_client.get("/web/app.js").text
    assert not re.search(r"""fetch\(\s*[`'"](/|https?:)""", script)
    assert not re.search(r"""api\(\s*[`'"](/|https?:)""", script)
    assert "https://" not in script and "http://" not in script
    assert "localStorage" not in script and "sessionStorage" not in script and "cookie" not in script
    assert "url(" not in keyed_client.get("/web/app.css").text  # no font or image from anywhere


def test_the_page_is_left_out_of_the_openapi_document_and_the_api_still_needs_the_key(keyed_client):
    assert not [p for p in keyed_client.get("/openapi.json").json()["paths"] if p == "/" or p.startswith("/web")]
    assert keyed_client.get("/models").status_code == 401
    assert keyed_client.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_flowie_web_ui_false_leaves_the_page_out(make_app):
    with TestClient(make_app(worker=False, web_ui=False)) as client:
        for path in PAGE_FILES:
            response = client.get(path)
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"
        assert client.get("/healthz").status_code == 200


def test_flowie_web_ui_is_read_from_the_environment(monkeypatch):
    from service.settings import load_settings

    assert load_settings().web_ui is True
    monkeypatch.setenv("FLOWIE_WEB_UI", "false")
    assert load_settings().web_ui is False


def test_the_page_files_are_package_data():
    root = Path(__file__).resolve().parents[2]
    line = next(x for x in (root / "pyproject.toml").read_text().splitlines() if x.startswith("service = ["))
    assert '"web/*"' in line  # installed with the package, not only present in a checkout
    assert {p.name for p in (root / "service" / "web").iterdir()} == {"index.html", "app.js", "app.css"}
