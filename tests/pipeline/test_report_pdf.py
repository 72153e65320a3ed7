"""report.pdf (#26 item 14): the report page printed by WeasyPrint, hashed, byte-stable, fetching nothing.

The PDF's text is read back with pypdf (an independent reader), never with WeasyPrint. Where WeasyPrint cannot be
imported (no Pango) the render tests skip with the reason and how to install it; the tests of what a run does
without it run everywhere.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from pipeline.report import pdf

REASON = pdf.unavailable()
needs_weasyprint = pytest.mark.skipif(REASON is not None, reason=pdf.not_produced_note(REASON or ""))
SHA = hashlib.sha256(b"a manifest").hexdigest()
CREATED = "2026-12-06T05:43:37+00:00"


def _png(width=40, height=30) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _page(extra: str = "", *, rows: int = 90) -> str:
    """A page shaped like report.html: screen CSS that scrolls tables, a figure, a folded record, many rows."""
    rows = "".join(f"<tr><td>artifact/{i}.npz</td><td><code>{'ab' * 32}</code></td></tr>" for i in range(rows))
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Run report T-1</title>"
        "<style>body{max-width:1100px}table{display:block;overflow-x:auto}code{overflow-wrap:anywhere}</style>"
        "</head><body><header><h1>Run report T-1</h1></header><nav><ol><li>table of contents</li></ol></nav>"
        "<section id=summary><h2>Summary</h2><p>test accuracy = 0.9133 [0.88, 0.94]</p>"
        "<div class=box>Privacy: the CNN classifier is (ε = 2.995, δ = 1e-05)-DP</div></section>"
        f"<figure><img src='{_png()}' alt=figure><figcaption>a figure</figcaption></figure>"
        "<details><summary>raw record</summary><p>folded record text</p></details>"
        f"<table><tr><th>path</th><th>SHA-256</th></tr>{rows}</table>{extra}</body></html>"
    )


def _text_of_pages(data: bytes) -> list[str]:
    from pypdf import PdfReader

    return [re.sub(r"\s+", " ", p.extract_text()) for p in PdfReader(io.BytesIO(data)).pages]


@needs_weasyprint
def test_every_page_has_its_number_and_the_manifest_hash_and_the_content_prints(caplog):
    pytest.importorskip("pypdf")
    from pypdf import PdfReader

    # the logger's own level too: an earlier in-process `main(["--quiet"])` leaves "pipeline" at WARNING
    with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="pipeline.report.pdf"):
        data = pdf.render(_page(), manifest_sha256=SHA, created=CREATED)
    # the page's screen-only CSS (overflow-x) draws WeasyPrint warnings: DEBUG lines of ours, not console lines
    assert not [r for r in caplog.records if r.name.startswith(("weasyprint", "fontTools"))]
    assert any("overflow-x" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    pages = _text_of_pages(data)
    assert len(pages) >= 2  # 90 table rows do not fit one A4 page
    for i, text in enumerate(pages, start=1):
        assert SHA in text.replace(" ", ""), f"page {i} lacks the manifest hash"
        assert f"page {i} of {len(pages)}" in text
    text = " ".join(pages)
    assert "Summary" in text and "test accuracy = 0.9133" in text and "ε = 2.995" in text
    assert "folded record text" in text  # a closed <details> still prints
    assert "table of contents" not in text  # the screen's navigation does not
    assert text.count("artifact/") == 90 and f"{'ab' * 32}" in text.replace(" ", "")  # no row cut at the edge
    assert data.count(b"/Subtype /Image") == 1  # the PNG data URI is embedded
    meta = PdfReader(io.BytesIO(data)).metadata
    assert meta.creation_date == meta.modification_date == datetime(2026, 12, 6, 5, 43, 37, tzinfo=timezone.utc)
    assert meta.title == "Run report T-1"


@needs_weasyprint
def test_two_renders_are_byte_identical_even_seconds_apart():
    """fontTools stamps each font subset with the clock unless SOURCE_DATE_EPOCH is set: renders 1 s apart differed."""
    page = _page(rows=10)
    first = pdf.render(page, manifest_sha256=SHA, created=CREATED)
    time.sleep(1.1)  # the font timestamp has 1 s resolution
    assert pdf.render(page, manifest_sha256=SHA, created=CREATED) == first
    assert "SOURCE_DATE_EPOCH" not in os.environ  # restored after the render
    other = pdf.render(page, manifest_sha256=SHA, created="2026-12-07T00:00:00Z")  # null: the date is in the bytes
    assert other != first


@needs_weasyprint
@pytest.mark.slow  # a second Python process importing WeasyPrint: ~10 s under load
def test_another_process_with_another_hash_seed_renders_the_same_bytes_cold_as_this_one_warmed_up(tmp_path):
    page = _page()
    (tmp_path / "page.html").write_text(page, encoding="utf-8")
    code = (  # pdf.py loaded by path: importing the pipeline.report package would import torch (~20 s under load)
        "import hashlib, importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('pdf', {pdf.__file__!r}); "
        "pdf = importlib.util.module_from_spec(spec); spec.loader.exec_module(pdf); "
        f"sys.stdout.write(hashlib.sha256(pdf.render(open(sys.argv[1], encoding='utf-8').read(), "
        f"manifest_sha256={SHA!r}, created={CREATED!r})).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another process, another string-hash order
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "page.html")], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    pdf.warm_up()  # the report stage's prepare: a warmed-up process prints what a cold one prints
    assert out.stdout == hashlib.sha256(pdf.render(page, manifest_sha256=SHA, created=CREATED)).hexdigest()


def test_the_collector_is_paused_for_a_render_and_resumed_after_it_also_when_it_fails(monkeypatch):
    import gc

    seen = []
    monkeypatch.setattr(pdf, "unavailable", lambda: None)
    monkeypatch.setattr(pdf, "_render", lambda *a: seen.append(gc.isenabled()) or b"%PDF")
    assert gc.isenabled()
    assert pdf.render("<p>x</p>", manifest_sha256=SHA, created=None) == b"%PDF"
    assert seen == [False] and gc.isenabled()

    monkeypatch.setattr(pdf, "_render", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pdf.render("<p>x</p>", manifest_sha256=SHA, created=None)
    assert gc.isenabled()

    gc.disable()  # a caller that paused it itself finds it paused still
    try:
        monkeypatch.setattr(pdf, "_render", lambda *a: b"%PDF")
        pdf.render("<p>x</p>", manifest_sha256=SHA, created=None)
        assert not gc.isenabled()
    finally:
        gc.enable()


@needs_weasyprint
@pytest.mark.parametrize(
    "extra",
    ["<img src='http://127.0.0.1:9/x.png'>", "<link rel=stylesheet href='file:///etc/passwd'>", "<img src='x.png'>"],
)
def test_nothing_but_data_uris_is_fetched(extra):
    with pytest.raises(RuntimeError, match="non-data URL"):
        pdf.render(_page(extra, rows=3), manifest_sha256=SHA, created=CREATED)
    content = {"reproducibility": {"self_hash_note": "Hashes are in manifest.json."}, "files": {"html": "report.html"}}
    noted, html, data = pdf.with_pdf(
        content, lambda c: _page(extra, rows=3), enabled=True, manifest_sha256=SHA, created=CREATED
    )  # the run goes on without the PDF and says why
    assert data == b"" and noted["reproducibility"]["pdf"]["produced"] is False
    assert "non-data URL" in noted["reproducibility"]["pdf"]["reason"] and "pdf" not in noted["files"]


@needs_weasyprint
def test_a_listening_server_gets_no_connection():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.setblocking(False)
        port = server.getsockname()[1]
        extra = f"<img src='http://127.0.0.1:{port}/x.png'><link rel=stylesheet href='http://127.0.0.1:{port}/s.css'>"
        with pytest.raises(RuntimeError, match="2 non-data URL"):
            pdf.render(_page(extra, rows=1), manifest_sha256=SHA, created=CREATED)
        with pytest.raises(BlockingIOError):  # nothing connected
            server.accept()
        probe = socket.create_connection(("127.0.0.1", port), timeout=5)  # positive control: a connection is seen
        probe.close()
        time.sleep(0.2)
        server.accept()[0].close()


def test_a_bad_manifest_hash_is_refused():
    if REASON is not None:
        pytest.skip(pdf.not_produced_note(REASON))
    with pytest.raises(ValueError, match="64 lower-case hex digits"):
        pdf.render(_page(rows=1), manifest_sha256="../etc", created=CREATED)


def _note_page(content) -> str:
    return f"<html><body><h1>Run report</h1><p>{content['reproducibility']['self_hash_note']}</p></body></html>"


def test_without_weasyprint_the_run_goes_on_and_the_report_says_the_pdf_is_absent(monkeypatch, caplog):
    reason = "WeasyPrint cannot be imported (OSError: cannot load library 'libpango-1.0-0')"
    monkeypatch.setattr(pdf, "unavailable", lambda: reason)
    content = {"reproducibility": {"self_hash_note": "Hashes are in manifest.json."}, "files": {"html": "report.html"}}
    with caplog.at_level(logging.WARNING, logger="pipeline.report.pdf"):
        noted, html, data = pdf.with_pdf(content, _note_page, enabled=True, manifest_sha256=SHA, created=CREATED)
    assert data == b"" and content["reproducibility"] == {"self_hash_note": "Hashes are in manifest.json."}
    assert noted["reproducibility"]["pdf"] == {"file": "report.pdf", "produced": False, "reason": reason}
    assert f"report.pdf: not produced ({reason}); install it with `pip install '.[pdf]'`" in html
    assert "pdf" not in noted["files"]
    assert [r.getMessage() for r in caplog.records] == [pdf.not_produced_note(reason)]  # one warning line
    noted, html, data = pdf.with_pdf(content, _note_page, enabled=False, manifest_sha256=SHA, created=CREATED)
    assert data == b"" and "report.pdf: off (report.pdf = false)" in html  # switched off: no install advice


@needs_weasyprint
def test_with_pdf_renders_the_very_html_it_returns():
    content = {"reproducibility": {"self_hash_note": "Hashes are in manifest.json."}, "files": {"html": "report.html"}}
    noted, html, data = pdf.with_pdf(content, _note_page, enabled=True, manifest_sha256=SHA, created=None)
    assert noted["files"]["pdf"] == "report.pdf" and noted["reproducibility"]["pdf"]["produced"] is True
    assert "report.pdf is this page printed by WeasyPrint" in html
    assert data == pdf.render(html, manifest_sha256=SHA, created=None)
    assert "report.pdf is this page printed by WeasyPrint" in " ".join(_text_of_pages(data))


# --------------------------------------------------------------------------- a DP run, end to end


def _section_text(html: str, section_id: str) -> str:
    """The text of ``<section id=section_id>`` (nested sections included), as a browser would show it."""
    from html.parser import HTMLParser

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__(convert_charrefs=True)
            self.depth, self.parts = 0, []

        def handle_starttag(self, tag, attrs):
            if tag == "section" and (self.depth or dict(attrs).get("id") == section_id):
                self.depth += 1

        def handle_endtag(self, tag):
            if tag == "section" and self.depth:
                self.depth -= 1

        def handle_data(self, data):
            if self.depth:
                self.parts.append(data)

    parser = Collect()
    parser.feed(html)
    return " ".join(parser.parts)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    from auditml_core import config as config_mod
    from auditml_core.config import load_config
    from pipeline import runner
    from pipeline.rundir import RunDir
    from tests.tiny import EXPLAIN, TRAIN

    overrides = [*TRAIN, *EXPLAIN, "dp.enabled=true", "report.pdf=true"]
    cfg = load_config(None, overrides)
    run = RunDir.create(
        tmp_path_factory.mktemp("pdf") / "runs", config_toml=config_mod.to_toml(cfg), command=["test"], device="cpu"
    )
    runner.run_stages(cfg, run, ["data", "train", "evaluate", "explain", "report"])
    return run


@needs_weasyprint
@pytest.mark.slow  # a DP run through the report stage, and a re-render: ~1-2 min on a loaded 2-core machine
def test_a_dp_runs_pdf_is_hashed_holds_the_summary_and_epsilon_and_rerenders_byte_for_byte(dp_run, monkeypatch):
    pytest.importorskip("pypdf")
    from pipeline import evidence

    art = dp_run.manifest["artifacts"]["report.pdf"]
    data = dp_run.read("report.pdf")
    assert art["stage"] == "report" and art["sha256"] == hashlib.sha256(data).hexdigest()
    content = json.loads(dp_run.read("report.json"))
    assert content["files"]["pdf"] == "report.pdf" and content["reproducibility"]["pdf"]["produced"] is True
    pages = _text_of_pages(data)
    text = " ".join(pages)
    manifest_sha = hashlib.sha256(dp_run.read("report_provenance.json")).hexdigest()
    assert all(manifest_sha in p.replace(" ", "") for p in pages)
    html = dp_run.read("report.html").decode()
    summary = _section_text(html, "summary")  # the page's summary, whatever its layout, word for word in the PDF
    assert len(summary) > 100 and re.sub(r"\s+", "", summary) in re.sub(r"\s+", "", text)
    stated = set(re.findall(r"ε = [0-9.]+", content["summary"]["privacy"]))  # every ε the summary records
    assert stated and stated <= set(re.findall(r"ε = [0-9.]+", text)) == set(re.findall(r"ε = [0-9.]+", html))
    assert evidence.rerender(dp_run) == []  # verify --rerender: report.pdf re-rendered byte for byte
    monkeypatch.setattr(pdf, "unavailable", lambda: "WeasyPrint cannot be imported (ImportError: test)")
    problems = evidence.rerender(dp_run)  # a verifier without WeasyPrint is told why, not just "differs"
    assert any(p.startswith("not reproduced: report.pdf (cannot be re-rendered here: WeasyPrint") for p in problems)
