"""The report's Jinja2 templates: package data, autoescape in both media, and line joining that never touches a value."""

import tomllib
from fnmatch import fnmatch
from pathlib import Path

from pipeline.report import html_page
from pipeline.report.templating import TEMPLATES, html_environment, markdown_environment

ROOT = Path(__file__).resolve().parents[2]
HOSTILE = "<script>alert('x')</script> | `b` \"q\" &"


def test_every_template_is_package_data_so_an_installed_wheel_has_it():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pipeline"]
    templates = sorted(p.relative_to(ROOT / "pipeline").as_posix() for p in TEMPLATES.iterdir())
    assert templates and all(t.endswith(".j2") for t in templates)
    assert all(any(fnmatch(t, g) for g in globs) for t in templates), (templates, globs)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.lower().startswith("jinja2>=") for d in deps)


def test_autoescape_escapes_values_for_each_medium_and_leaves_template_markup():
    page = html_environment().from_string("<p title='{{ v }}'>\n  {{ v }}\n</p>").render(v=HOSTILE)
    assert page == (
        "<p title='&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; | `b` &quot;q&quot; &amp;'>"
        "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; | `b` &quot;q&quot; &amp;</p>"
    )
    card = markdown_environment().from_string("| {{ v }} |\n").render(v=HOSTILE + "\nnext")
    assert card == "| &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; \\| &#96;b&#96; &quot;q&quot; &amp; next |\n"


def test_line_joining_removes_template_line_breaks_but_never_a_values():
    value = "line one\n    indented line two"
    out = html_environment().from_string("<pre>\n  {{ v }}\n</pre>\n<p>a</p>").render(v=value)
    assert out == "<pre>line one\n    indented line two</pre><p>a</p>"


def test_a_section_renders_alone_and_the_page_keeps_its_content_security_policy():
    html = html_page.render_section("data", {"data": {}, "privacy": {"enabled": False}})
    assert html.startswith("<section id=data><h2>Data provenance</h2><p class=lead>") and html.endswith(
        "</p></section>"
    )
    assert "protected by DP" not in html  # this content has no DP: the page does not say DP protects anything
    assert html_page.CSP == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
