"""``report.pdf``: the report page printed by WeasyPrint, with its own print stylesheet.

The PDF is rendered from the very HTML string written as ``report.html`` (never a second template), with
:data:`PRINT_CSS` added as a user stylesheet: A4 pages, a page number "page N of M" and the SHA-256 of the
manifest the report read (``report_provenance.json``, the hash in the page's header) in the margin of every
page, and the screen layout's scrolling tables and hidden navigation undone for paper.

Nothing is fetched while rendering: the page is self-contained (figures are PNG ``data:`` URIs, styles
inline) and the URL fetcher refuses every scheme but ``data:``. The bytes are a function of the HTML and the
run's recorded times: the PDF's creation and modification dates are the run's manifest time (never the
clock) and its file identifier is derived from the content hash, so re-rendering the same run on the same
installation (WeasyPrint, Pango, fonts) gives the same bytes (``verify --rerender``).

WeasyPrint is an optional extra (``pip install '.[pdf]'``, part of ``make install``) and needs the system's
Pango; where it cannot be imported the run goes on without a PDF and records why (:func:`unavailable`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import re
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping

log = logging.getLogger(__name__)

FILE = "report.pdf"
INSTALL_HINT = (
    "install it with `pip install '.[pdf]'` (or `make install`); WeasyPrint also needs the system's Pango "
    "(Debian/Ubuntu: apt-get install libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0)"
)
_HEX = re.compile(r"[0-9a-f]{64}")

# A user stylesheet (WeasyPrint's ``stylesheets``): the page's own rules are author rules and win over a user's
# normal ones, so every declaration that must override the page is !important. @page margin boxes carry the
# title, the manifest hash and the page numbers. The screen layout's scrolling tables (display: block;
# overflow-x: auto) would be cut at the paper's edge, so tables are tables again and long words (hashes,
# paths) wrap; `overflow-wrap: break-word`, not the page's `anywhere`: with `anywhere` every character is
# a break opportunity when the table's column widths are measured (1.8x the CPU time of the whole render on a 41-page report, measured).
PRINT_CSS = """
@page {
  size: A4;
  margin: 16mm 14mm 20mm 14mm;
  @top-left { content: string(report-title); font-family: sans-serif; font-size: 8pt; color: #555; }
  @bottom-left {
    content: "manifest SHA-256 (report_provenance.json): __MANIFEST__";
    font-family: monospace; font-size: 6.5pt; color: #555;
  }
  @bottom-right {
    content: "page " counter(page) " of " counter(pages); font-family: sans-serif; font-size: 8pt; color: #555;
  }
}
h1 { string-set: report-title content(); }
body { max-width: none !important; margin: 0 !important; padding: 0 !important; font-size: 9.5pt !important;
  line-height: 1.35 !important; }
nav { display: none !important; }
h2, h3, h4 { break-after: avoid; }
table { display: table !important; max-width: 100% !important; overflow: visible !important; font-size: 8pt !important; }
th, td, code { overflow-wrap: break-word !important; }
tr, figure { break-inside: avoid; }
pre { white-space: pre-wrap !important; word-break: break-all !important; font-size: 7.5pt !important; }
img { max-width: 100% !important; height: auto !important; }
"""


@lru_cache(maxsize=1)
def unavailable() -> str | None:
    """Why no PDF can be rendered here (WeasyPrint missing or its system libraries absent), or None when it can."""
    try:
        import weasyprint  # noqa: F401  # cffi loads Pango/HarfBuzz at import: a missing library fails here
        from weasyprint.urls import URLFetcher  # noqa: F401  # WeasyPrint >= 68 (the fetcher class used below)
    except (ImportError, OSError) as exc:  # OSError: cffi could not load a shared library (Pango)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return f"WeasyPrint cannot be imported ({type(exc).__name__}: {first})"
    return None


def with_pdf(
    content: Mapping[str, Any],
    render_html: Callable[[Mapping[str, Any]], str],
    *,
    enabled: bool,
    manifest_sha256: str,
    created: str | None,
) -> tuple[dict[str, Any], str, bytes]:
    """The report's content, its HTML and its PDF, the content saying whether and why not the PDF was produced.

    The content's ``reproducibility.pdf`` records the outcome and ``reproducibility.self_hash_note`` (shown under
    the page's artifact list) says it in words, so the page itself states whether ``report.pdf`` exists. Never
    raises for the PDF: WeasyPrint missing, its libraries absent, or a failed render leave ``b""`` and the reason.

    Parameters
    ----------
    content : the report content (not modified).
    render_html : renders a content tree to the page's HTML.
    enabled : the ``report.pdf`` setting.
    manifest_sha256, created : as for :func:`render` (``created`` None: no dates in the PDF).

    Returns
    -------
    (content, html, pdf_bytes)
    """
    reason = None if enabled else "report.pdf = false"
    reason = reason or unavailable()
    if reason is None:
        noted = _noted(content, None)
        html = render_html(noted)
        try:
            return noted, html, render(html, manifest_sha256=manifest_sha256, created=created)
        except Exception as exc:  # a PDF never costs the run its report: the page says it failed and why
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            reason = f"WeasyPrint failed: {type(exc).__name__}: {first}"
    if enabled:
        log.warning("%s", not_produced_note(reason))
    noted = _noted(content, reason)
    return noted, render_html(noted), b""


def _noted(content: Mapping[str, Any], reason: str | None) -> dict[str, Any]:
    """``content`` with the PDF's outcome in ``reproducibility`` (and ``files.pdf`` when there is one)."""
    r = dict(content["reproducibility"])
    if reason is None:
        r["pdf"] = {"file": FILE, "produced": True, "reason": None}
        words = (
            f" {FILE} is this page printed by WeasyPrint (A4, page numbers, and on every page the SHA-256 of "
            "report_provenance.json shown at the top); manifest.json records its hash too."
        )
        files = {**content["files"], "pdf": FILE}
    else:
        r["pdf"] = {"file": FILE, "produced": False, "reason": reason}
        words = " " + (
            not_produced_note(reason) if reason != "report.pdf = false" else f"{FILE}: off (report.pdf = false)."
        )
        files = dict(content["files"])
    r["self_hash_note"] = str(r.get("self_hash_note") or "").rstrip() + words
    return {**content, "reproducibility": r, "files": files}


def not_produced_note(reason: str) -> str:
    """The one line a run records, and the report shows, when no PDF was rendered (with how to install it)."""
    hint = f"; {INSTALL_HINT}" if reason.startswith("WeasyPrint cannot be imported") else ""
    return f"{FILE}: not produced ({reason}){hint}"


def _pdf_date(iso: str) -> str:
    """A recorded ISO 8601 time as the W3C date-time WeasyPrint's metadata takes (UTC, whole seconds)."""
    when = datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def render(html: str, *, manifest_sha256: str, created: str | None) -> bytes:
    """Print ``html`` to PDF bytes with :data:`PRINT_CSS`; the same arguments give the same bytes.

    Parameters
    ----------
    html : the report page exactly as written to ``report.html``.
    manifest_sha256 : SHA-256 (hex) of ``report_provenance.json``, printed in every page's margin.
    created : the run's manifest time (ISO 8601): the PDF's creation and modification date; None (a report
        rendered without a manifest) writes no dates.

    Returns
    -------
    bytes
        The PDF.

    Raises
    ------
    RuntimeError
        If WeasyPrint cannot be imported (:func:`unavailable` says why), or the page asks for anything but a
        ``data:`` URI (a self-contained page never does).
    ValueError
        If ``manifest_sha256`` is not 64 lower-case hex digits or ``created`` is not an ISO 8601 time.
    """
    reason = unavailable()
    if reason:
        raise RuntimeError(not_produced_note(reason))
    if not _HEX.fullmatch(manifest_sha256):
        raise ValueError(f"manifest_sha256 must be 64 lower-case hex digits, got {manifest_sha256!r}")
    date = _pdf_date(created) if created else None
    with _weasyprint_log_to_debug(), _no_collection():
        return _render(html, manifest_sha256, date)


@contextmanager
def _no_collection() -> Iterator[None]:
    """The garbage collector paused for a render: WeasyPrint's layout boxes live until the PDF is written, and the
    collector's passes over them took ~1.1 s of a 9.7 s render of the default report and found little to free
    (measured; without them the render's peak memory is 17 MB higher). Its next pass frees what the render left."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def warm_up() -> None:
    """Print a one-page document: WeasyPrint's first render in a process loads the fonts and parses its own
    stylesheets, ~0.55 s of the report's PDF (measured: 9.2 s cold, 8.65 s after this 0.66 s render)."""
    render(
        "<h1>report</h1><p>text <code>code</code></p><table><tr><td>cell</td></tr></table>",
        manifest_sha256="0" * 64,
        created=None,
    )


def _render(html: str, manifest_sha256: str, date: str | None) -> bytes:
    from weasyprint import CSS, HTML
    from weasyprint.urls import URLFetcher

    refused: list[str] = []

    class _DataOnly(URLFetcher):
        """WeasyPrint's fetcher limited to ``data:`` URIs: nothing is read from the network or the disk."""

        def fetch(self, url, headers=None):
            if not url.startswith("data:"):
                refused.append(url)
                raise ValueError(f"report.pdf fetches nothing: refused {url[:80]!r}")
            return super().fetch(url, headers)

    fetcher = _DataOnly(allowed_protocols=("data",))
    css = CSS(string=PRINT_CSS.replace("__MANIFEST__", manifest_sha256), url_fetcher=fetcher)
    # base_url: a page that names a relative URL resolves it to a file: URI, which the fetcher refuses
    document = HTML(string=html, base_url="about:blank", url_fetcher=fetcher).render(stylesheets=[css])
    document.metadata.created = document.metadata.modified = date  # never the clock
    identifier = hashlib.sha256(f"{manifest_sha256}:{hashlib.sha256(html.encode()).hexdigest()}".encode()).hexdigest()
    with _source_date_epoch(date):
        data = document.write_pdf(pdf_identifier=identifier[:32].encode("ascii"))
    if refused:  # WeasyPrint logs a failed fetch and goes on; a page that asked for anything is not printed
        raise RuntimeError(f"report.pdf: the page asked for {len(refused)} non-data URL(s), e.g. {refused[0][:80]!r}")
    return data


@contextmanager
def _weasyprint_log_to_debug() -> Iterator[None]:
    """WeasyPrint's and fontTools' log lines, while rendering, as DEBUG lines of this module (``-v`` shows them).

    They are about the page's screen-only CSS (``position: sticky``, ``overflow-x``, a width media query: ignored
    on paper, as intended) and the font subsetter; at WARNING they would put ~12 third-party lines on every run's
    console. Each distinct message is kept once.
    """
    seen: dict[str, None] = {}

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.setdefault(f"{record.name}: {record.getMessage()}", None)

    loggers = [logging.getLogger(n) for n in ("weasyprint", "fontTools")]
    saved = [(lg.propagate, lg.handlers[:]) for lg in loggers]
    handler = Collect()
    for lg in loggers:
        lg.propagate, lg.handlers = False, [handler]
    try:
        yield
    finally:
        for lg, (propagate, handlers) in zip(loggers, saved):
            lg.propagate, lg.handlers = propagate, handlers
        for message in seen:
            log.debug("while printing report.pdf: %s", message)


@contextmanager
def _source_date_epoch(date: str | None) -> Iterator[None]:
    """``SOURCE_DATE_EPOCH`` set to ``date`` while the PDF is written, then restored.

    WeasyPrint subsets each font with fontTools, whose ``TTFont.save`` stamps the subset's ``head.modified``
    with the clock unless ``SOURCE_DATE_EPOCH`` is set (the reproducible-builds convention): without it two
    renders of the same page differ in every embedded font, one second apart.
    """
    when = datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) if date else None
    epoch = str(int(when.timestamp())) if when else "0"  # no recorded time: the fonts carry 1970, not the clock
    before = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = epoch
    try:
        yield
    finally:
        if before is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = before
