"""The report stage: schema, escaping of user strings, hashes of earlier artifacts, verify, self-containment."""

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from auditml_core import config as config_mod
from auditml_core.config import load_config
from auditml_core.models import MODELS
from pipeline import report, runner
from pipeline.report import html_page as report_html
from pipeline.report.privacy import privacy_section
from pipeline.rundir import RunDir

jsonschema = pytest.importorskip("jsonschema")

HOSTILE = "<script>alert(1)</script>"
TARGET = 'y"><img src=x onerror=alert(2)>'
from tests.tiny import EXPLAIN as SMALL_EXPLAIN  # noqa: E402
from tests.tiny import TRAIN as TINY  # noqa: E402

STAGES = ["data", "train", "evaluate", "explain", "report"]


def hostile_csv(folder):
    """The diabetes table with one column named like a script tag and a target named like an attribute break-out."""
    from sklearn.datasets import load_diabetes

    bunch = load_diabetes()
    names = list(bunch.feature_names)
    names[2] = HOSTILE
    path = folder / "<b>evil<i>.csv"  # no slash: a file name cannot hold one
    header = ",".join('"' + n.replace('"', '""') + '"' for n in [*names, TARGET])
    rows = np.column_stack([bunch.data, bunch.target])
    path.write_text(header + "\n" + "\n".join(",".join(f"{v:.6g}" for v in r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    csv = hostile_csv(folder)
    # three dependence plots, as by default (tests/tiny.py asks for one): the figures test counts them
    overrides = (
        TINY + SMALL_EXPLAIN + [f'data.tabular_csv="{csv}"', f"data.target='{TARGET}'", "explain.n_dependence_plots=3"]
    )
    cfg = load_config(None, overrides)
    assert cfg.data.target == TARGET
    run = RunDir.create(
        folder / "runs",
        config_toml=config_mod.to_toml(cfg),
        command=["python", "-m", "pipeline", *overrides],
        device="cpu",
    )
    runner.run_stages(cfg, run, STAGES)
    return run


def test_report_files_are_recorded_and_json_validates(hostile_run):
    run = hostile_run
    assert run.stage_status("report") == "complete"
    for rel in ("report.html", "report.json", "model_card_regressor.md", "model_card_cnn.md"):
        assert run.manifest["artifacts"][rel]["stage"] == "report"
    content = json.loads(run.read("report.json"))
    jsonschema.validate(content, report.schema())
    jsonschema.Draft202012Validator.check_schema(report.schema())
    # The report is a twin of what the stages recorded.
    assert content["data"]["tabular"]["feature_names"][2] == HOSTILE
    assert content["summary"]["privacy"].startswith("No formal privacy guarantee")
    assert content["explanations"]["background_split"] == "public"
    assert content["reproducibility"]["seeds"]["explain"] == run.manifest["stages"]["explain"]["seed"]
    # The explain time is the models' times added (parts may run side by side): as the stage records it.
    parts = json.loads(run.read("explain/metrics.json"))["models"]
    per_model = {name: sum(e["seconds"] for e in m["explanations"].values()) for name, m in parts.items()}
    added = sum(per_model.values())
    assert content["explanations"]["seconds"] >= added
    assert all(0 < seconds < added for seconds in per_model.values())  # one model's time alone would not pass
    assert "the models' times added" in run.read("report.html").decode()


def test_broken_report_json_fails_the_schema(hostile_run):
    content = json.loads(hostile_run.read("report.json"))
    del content["privacy"]["not_covered"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(content, report.schema())


def test_hostile_names_are_text_in_html_and_model_cards(hostile_run):
    html = hostile_run.read("report.html").decode()
    assert HOSTILE not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "onerror=alert(2)&gt;" in html
    assert "<b>evil" not in html and "&lt;b&gt;evil&lt;i&gt;.csv" in html
    assert "<script" not in html.lower()
    for rel in ("model_card_regressor.md", "model_card_cnn.md"):
        card = hostile_run.read(rel).decode()
        assert HOSTILE not in card and "<img" not in card and "<b>" not in card
    card = hostile_run.read("model_card_regressor.md").decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card
    for section in (
        "Model details",
        "Intended use",
        "Factors",
        "Metrics",
        "Evaluation data",
        "Training data",
        "Quantitative analyses",
        "Ethical considerations",
        "Caveats and recommendations",
    ):
        assert f"## {section}" in card


def test_a_users_csv_is_not_described_as_scikit_learns_scaled_diabetes_data(hostile_run):
    # #26 item 3: the subgroup note said "scikit-learn's diabetes features are already mean-centred and scaled"
    # for any table, a user's CSV in years included.
    content = json.loads(hostile_run.read("report.json"))
    assert "load_diabetes" not in json.dumps(content["data"]["tabular"]["provenance"])
    assert content["models"]["regressor"]["metrics"]["test"]["subgroups"]  # the note is printed under these tables
    html = hostile_run.read("report.html").decode()
    assert "Group values are in the dataset&#x27;s units." in html or "Group values are in the dataset's units." in html
    assert "diabetes features are already mean-centred and scaled)." not in html
    assert "already mean-centred and scaled, not years" not in hostile_run.read("model_card_regressor.md").decode()


def test_the_regressor_is_compared_with_ridge_and_its_cohorts_on_validation_as_recomputed_here(hostile_run):
    # #26 items 8 and 11, recomputed from the run directory with scikit-learn and numpy.
    from sklearn.metrics import r2_score

    from auditml_core import training
    from pipeline import data, train

    run = hostile_run
    content = json.loads(run.read("report.json"))
    ds, trained = data.load(run.read)["tabular"], train.load(run.read)
    model = trained.models["regressor"].build()
    ridge = json.loads(run.read("models/ridge.json"))  # the recorded coefficients, not the fitted object

    def units(split, raw):
        return ds.target_to_original(raw), ds.target_to_original(ds.y[split])

    p_mlp, y = units("test", training.predict(model, ds.x["test"]))
    p_ridge, _ = units("test", ds.x["test"] @ np.asarray(ridge["coef"]) + ridge["intercept"])
    cmp = content["models"]["regressor"]["baseline"]["comparison"]
    assert cmp == content["summary"]["baseline"]["comparison"]
    assert cmp["value"] == pytest.approx(r2_score(y, p_mlp) - r2_score(y, p_ridge), abs=1e-9)
    assert cmp["ci95"][0] <= cmp["value"] <= cmp["ci95"][1]
    assert cmp["distinguishable"] == (cmp["ci95"][0] > 0 or cmp["ci95"][1] < 0)
    verdict = "cannot be told apart" if not cmp["distinguishable"] else " is better than "
    card, html = run.read("model_card_regressor.md").decode(), run.read("report.html").decode()
    assert verdict in card and verdict in html and "MLP minus Ridge test R²" in card
    # the worst test cohort, looked up on the validation split by its recorded rule
    worst = content["models"]["regressor"]["metrics"]["test"]["cohorts"]["cohorts"][0]
    p_val, y_val = units("val", training.predict(model, ds.x["val"]))
    x_val = ds.x["val"] * np.asarray(ds.preprocessing["x_std"]) + np.asarray(ds.preprocessing["x_mean"])
    mask = np.ones(len(y_val), dtype=bool)
    for c in worst["conditions"]:
        v = x_val[:, c["feature_index"]]
        mask &= (v <= c["threshold"]) if c["op"] == "<=" else (v > c["threshold"])
    err = np.abs(y_val - p_val)
    rep = worst["replication"]
    assert rep["split"] == "val" and rep["n"] == int(mask.sum())
    if mask.any():
        assert rep["mae"] == pytest.approx(err[mask].mean()) and rep["mae_ratio"] == pytest.approx(
            err[mask].mean() / err.mean()
        )
    assert "on the validation split" in html and "on the validation split" in card


def test_model_cards_carry_the_toolkit_fields_and_say_not_stated_for_what_the_run_cannot_know(hostile_run):
    # #26 item 12: owners, contact, licences, citation, data links, sensitive data, trade-offs, risks, formats and a
    # Hugging Face YAML header; values a run cannot know come from [card] and are never invented.
    import yaml

    from pipeline.report import model_card

    card = hostile_run.read("model_card_regressor.md").decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert card.startswith("---\n") and meta["license"] == "not stated" and meta["library_name"] == "pytorch"
    assert "tabular-regression" in meta["tags"] and meta["metrics"] == ["r2", "rmse", "mae"]
    assert "evil" in meta["datasets"][0]  # a user's file is named by its path, not passed off as a known data set
    for section in (
        "Owners, licence and citation",
        "Data links and sensitive data",
        "Trade-offs",
        "Risks and mitigations",
    ):
        assert f"## {section}" in card
    assert "- Owner: not stated; contact: not stated." in card and "of the training data: not stated" in card
    assert "Sensitive data: not stated (columns whose names suggest personal attributes: `age`, `sex`)" in card
    assert "## Input and output formats" in card and "in target units" in card
    # the owner's values, shown as given (escaped), and the known data set's links and sensitivity
    content = json.loads(hostile_run.read("report.json"))
    content["card"] = {
        "owner": "Team <b>Q</b>",
        "contact": "q@example.org",
        "license": "apache-2.0",
        "data_license": "CC BY 4.0",
        "intended_users": "auditors",
        "sensitive_data": "",
        "citation": "@misc{q,\n  title={Q}}",
    }
    content["data"]["tabular"]["provenance"]["source"] = "sklearn.datasets.load_diabetes (embedded)"
    again = model_card.render(content, "regressor")
    assert yaml.safe_load(again.split("---\n")[1])["license"] == "apache-2.0"
    assert "- Owner: Team &lt;b&gt;Q&lt;/b&gt;; contact: q@example.org." in again and "<b>" not in again
    assert "```\n@misc{q,\n  title={Q}}\n```" in again and "of the training data: CC BY 4.0" in again
    assert "https://www4.stat.ncsu.edu/~boos/var.select/diabetes.html" in again
    assert "age, sex, body mass index" in again and "GDPR" in again
    cnn = hostile_run.read("model_card_cnn.md").decode()
    assert "image-classification" in yaml.safe_load(cnn.split("---\n")[1])["tags"]
    assert "archive.ics.uci.edu/dataset/80" in cnn and "probability per class" in cnn


def test_the_report_maps_eu_ai_act_annex_iv_onto_its_own_sections(hostile_run):
    # #26 item 13: for each point of Annex IV, where the run covers it or "not covered: provide X".
    content = json.loads(hostile_run.read("report.json"))
    html = hostile_run.read("report.html").decode()
    items = {it["item"]: it for it in content["annex_iv"]["items"]}
    expected = ["1(a)", "1(b)", "1(c)", "1(d)", "1(e)", "1(f)", "1(g)", "1(h)"]
    expected += ["2(a)", "2(b)", "2(c)", "2(d)", "2(e)", "2(f)", "2(g)", "2(h)", "3", "4", "5", "6", "7", "8", "9"]
    assert list(items) == expected
    for it in items.values():
        assert (it["status"] == "covered") == (it["provide"] == "")  # anything short of covered says what to add
        for where in it["where"]:
            if where.startswith("#"):
                assert f"id={where[1:].split(' ', 1)[0]}>" in html  # every pointer lands on a section of this page
    assert items["2(a)"]["status"] == items["2(c)"]["status"] == "covered"
    assert items["2(g)"]["status"] == "partly" and "signature" in items["2(g)"]["provide"]
    assert "dated" in items["2(g)"]["where"][-1] and "SHA-256" in items["2(g)"]["where"][-1]
    assert "per-group accuracy: MLP regressor" in items["3"]["where"][0]
    assert items["8"]["status"] == "not covered" and "not covered: provide the declaration" in html
    assert "<section id=annex-iv>" in html and "href='#annex-iv'" in html


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_and_lists_every_earlier_hash(hostile_run):
    html = hostile_run.read("report.html").decode()
    parser = _Tags()
    parser.feed(html)
    imgs = [a for t, a in parser.tags if t == "img"]
    assert len(imgs) >= 6 and all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert not [t for t, a in parser.tags if t in ("script", "link", "iframe", "object", "embed")]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)
    assert any(t == "meta" and a.get("http-equiv") == "Content-Security-Policy" for t, a in parser.tags)
    headings = [m.group(1) for m in re.finditer(r"<h2>([^<]+)</h2>", html)]
    assert headings[:3] == ["Verdicts", "Models at a glance", "Data provenance"]
    assert "Privacy" in headings and "What this report does not cover" in headings and headings[-1] == "Reproducibility"
    content = json.loads(hostile_run.read("report.json"))
    listed = {a["path"]: a["sha256"] for a in content["reproducibility"]["artifacts"]}
    for rel, entry in hostile_run.manifest["artifacts"].items():
        if entry["stage"] != "report":
            assert listed[rel] == entry["sha256"] and entry["sha256"] in html, rel
    assert not any(rel.startswith("report") or rel.startswith("model_card") for rel in listed)


def test_verify_catches_an_edited_report(hostile_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(hostile_run.path, copy)
    assert RunDir.open(copy).verify() == []
    path = copy / "report.html"
    path.write_text(path.read_text().replace("Verdicts", "Verdikts", 1))
    assert RunDir.open(copy).verify() == ["edited: report.html (SHA-256 differs from the manifest)"]


def _trained(record, n_train=300):
    models = {name: SimpleNamespace(training={"privacy": record, "n_train": n_train}) for name in MODELS}
    return SimpleNamespace(models=models)


def test_privacy_section_states_coverage_and_caveats():
    cfg = load_config(None, ["dp.enabled=true"])
    record = {
        "epsilon": 2.5,
        "delta": 1e-2,
        "target_epsilon": 3.0,
        "noise_multiplier": 1.1,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "total_steps": 100,
        "accountant": "prv",
        "opacus_version": "1.6.0",
        "noise_source": "os-csprng",
    }
    p = privacy_section(cfg, _trained(record), {}, None)
    assert p["enabled"] and "ε = 2.5, δ = 0.01" in p["statement"]
    assert any("ridge" in line.lower() for line in p["not_covered"])
    assert any("scaler" in line for line in p["not_covered"]) and any(
        "public split" in line for line in p["not_covered"]
    )
    assert any("explain/" in line for line in p["covered"])
    assert not any("secure_mode" in c for c in p["caveats"])  # the setting is gone: no caveat may recommend it
    assert "only while the seed stays secret" not in p["statement"]
    assert any("OS's CSPRNG" in c and "never recorded" in c for c in p["caveats"])
    seeded = privacy_section(cfg, _trained({**record, "noise_source": "seeded"}), {}, None)
    assert "-DP only while the seed stays secret" in seeded["statement"]
    assert any("dp.reproducible_noise = true" in c for c in seeded["caveats"])
    assert any("not below 1/n" in c for c in p["caveats"])  # δ = 0.01 >= 1/300
    off = privacy_section(load_config(None, []), _trained(None), {}, None)
    assert not off["enabled"] and off["statement"].startswith("No formal privacy guarantee") and not off["covered"]
    train_bg = privacy_section(
        load_config(None, ["dp.enabled=true", "explain.background_split=train"]),
        _trained({**record, "delta": 1e-5}),
        {},
        None,
    )
    assert any("explain/*" in line for line in train_bg["not_covered"])
    assert not any("explain/" in line for line in train_bg["covered"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Sets the title to "IMAGES decoded/total" once the page has loaded; injected into a copy, never the report.
PROBE = (
    "<script>addEventListener('load', () => { const i = [...document.images]; document.title = 'IMAGES ' + "
    "i.filter(x => x.complete && x.naturalWidth > 0).length + '/' + i.length; });</script>"
)


def _chromium(*args, profile):
    import subprocess

    return subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed; `make browser` installs it "
    "(Debian: apt-get install --no-install-recommends chromium)",
)


def _write_probe(html: str, script: str, path: Path) -> None:
    """The report with ``script`` before </body> and the CSP relaxed for inline scripts only."""
    probe = html.replace(report_html.CSP, report_html.CSP + "; script-src 'unsafe-inline'", 1)
    path.write_text(probe.replace("</body>", script + "</body>"))


@needs_chromium
def test_report_opens_in_a_headless_browser_and_every_image_decodes(hostile_run, tmp_path):
    html = hostile_run.read("report.html").decode()
    n_images = html.count("<img ")
    _write_probe(html, PROBE, tmp_path / "probe.html")
    dom = _chromium("--dump-dom", (tmp_path / "probe.html").as_uri(), profile=tmp_path / "p1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r"<title>(.*?)</title>", dom.stdout).group(1) == f"IMAGES {n_images}/{n_images}"
    assert n_images >= 6
    # The report itself, unmodified: it renders, and the console reports nothing (no blocked fetch, no error).
    shot = tmp_path / "report.png"
    proc = _chromium(
        "--window-size=1200,2400",
        f"--screenshot={shot}",
        (hostile_run.path / "report.html").as_uri(),
        profile=tmp_path / "p2",
    )
    assert proc.returncode == 0 and shot.stat().st_size > 20_000, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []


def test_report_runs_standalone_without_a_manifest(hostile_run):
    from pipeline import data, evaluate, explain_stage, train

    cfg = load_config(hostile_run.path / "config.toml")
    read = hostile_run.read
    inputs = {
        "data": data.load(read),
        "train": train.load(read),
        "evaluate": evaluate.load(read),
        "explain": explain_stage.load(read),
    }
    out = report.run(cfg, inputs, seed=0)
    jsonschema.validate(json.loads(report.dump(out)["report.json"]), report.schema())
    assert out.content["reproducibility"]["artifacts"] == [] and "&lt;script&gt;" in out.html


def test_model_cards_render_their_tables_in_standard_markdown(hostile_run):
    # A CommonMark + GFM-tables parser, not a regex: an unescaped "|" in a header or cell would change the column
    # count, and a table that does not parse would come out as a paragraph.
    markdown_it = pytest.importorskip("markdown_it")
    md = markdown_it.MarkdownIt("commonmark").enable("table")
    for name in MODELS:
        text = hostile_run.read(f"model_card_{name}.md").decode()
        tokens = md.parse(text)
        tables, i = [], 0
        while i < len(tokens):
            if tokens[i].type == "table_open":
                rows, cells = [], None
                while tokens[i].type != "table_close":
                    if tokens[i].type == "tr_open":
                        cells = []
                    elif tokens[i].type in ("th_open", "td_open"):
                        cells.append(tokens[i + 1].content)
                    elif tokens[i].type == "tr_close":
                        rows.append(cells)
                    i += 1
                tables.append(rows)
            i += 1
        n_pipes = sum(line.startswith("|") and line.endswith("|") for line in text.splitlines())
        assert sum(len(t) for t in tables) + len(tables) == n_pipes, f"{name}: a Markdown table did not parse"
        for rows in tables:
            assert len({len(r) for r in rows}) == 1, f"{name}: ragged table {rows}"
        checks = next(t for t in tables if t[0][0] == "explanation check")
        assert any("exact" in r[0] or "reference" in r[0] for r in checks[1:])
        if name == "regressor":
            shap_table = next(t for t in tables if t[0][1] == "mean |SHAP|")  # the escaped pipes render as pipes
            assert len(shap_table) == 11 and all(len(r) == 2 for r in shap_table)
            assert "standardised target units" in text and "already mean-centred and scaled" in text


def test_error_analysis_and_dependence_figures_are_in_the_report_with_their_hashes(hostile_run):
    html = hostile_run.read("report.html").decode()
    content = json.loads(hostile_run.read("report.json"))
    artifacts = hostile_run.manifest["artifacts"]
    reg = content["explanations"]["models"]["regressor"]
    kinds = {p["kind"] for p in reg["plots"]}
    assert {"dependence", "pdp"} <= kinds
    n_dep = len(reg["dependence"])
    assert n_dep == 3 and sum(p["kind"] == "pdp" for p in reg["plots"]) == n_dep
    cnn_plots = content["explanations"]["models"]["cnn"]["plots"]
    assert any(p["kind"] == "misclassified" for p in cnn_plots)
    for p in reg["plots"] + cnn_plots:
        png = hostile_run.read(p["file"])
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert p["sha256"] == artifacts[p["file"]]["sha256"] and p["sha256"] in html, p["file"]
    # The dependence titles name the feature (a user string, escaped in the page).
    for d in reg["dependence"]:
        assert sum(d["feature"] in p["title"] for p in reg["plots"] if p["kind"] in ("pdp", "dependence")) >= 2
    assert HOSTILE not in html
    # Training curves name the file they are drawn from and its hash.
    for name in MODELS:
        src = content["models"][name]["training_curves_source"]
        assert src["file"] == f"models/{name}.json" and src["sha256"] == artifacts[src["file"]]["sha256"]
        assert f"drawn from {src['file']} (SHA-256 {src['sha256']})" in html
    # Subgroups, cohorts and per-class errors are shown in the page, not only in report.json.
    test = content["models"]["regressor"]["metrics"]["test"]
    co = test["cohorts"]
    assert sum(c["n"] for c in co["cohorts"]) == test["n"]
    assert abs(sum(c["n"] * c["mae"] for c in co["cohorts"]) / test["n"] - test["mae"]) < 1e-9
    assert "Where the model is worst: error cohorts (test)" in html and "Descriptive:" in html
    assert "Test error by <code>sex</code>" in html
    cnn_test = content["models"]["cnn"]["metrics"]["test"]
    cm = cnn_test["confusion_matrix"]
    assert [r["support"] for r in cnn_test["per_class_errors"]] == [sum(row) for row in cm]
    assert "Per-class errors (test)" in html


# --------------------------------------------------------------------------- the first screen (issue 29)

FIRST_SCREEN_PX = (1280, 900)  # the window the first screen is judged in


def _ids_and_links(html):
    ids = set(re.findall(r"\sid=['\"]?([A-Za-z0-9_-]+)", html))
    links = re.findall(r"href=['\"]#([^'\"]+)['\"]", html)
    return ids, links


def test_every_area_has_a_verdict_row_in_the_json_and_the_page_and_every_link_lands(hostile_run):
    content = json.loads(hostile_run.read("report.json"))
    html = hostile_run.read("report.html").decode()
    verdicts = content["summary"]["verdicts"]
    jsonschema.validate(content, report.schema())
    assert sorted(v["area"] for v in verdicts) == sorted(
        ["privacy-guarantee", "privacy-audit", "utility", "subgroups", "explanations", "students", "provenance"]
    )
    ids, links = _ids_and_links(html)
    for v in verdicts:
        assert len(v["sentence"].split()) <= 25, v["sentence"]
        assert v["anchor"] in ids and v["evidence"][1:] in ids, v  # the row and its evidence both exist
        row = html.split(f"<tr id={v['anchor']} ", 1)[1].split("</tr>", 1)[0]
        assert f">{v['status']}</span>" in row.replace("✗ ", "").replace("! ", "").replace("✓ ", "").replace("– ", "")
        assert f"href='{v['evidence']}'" in row
    assert not [link for link in links if link not in ids]  # no internal link of the page points nowhere
    # this run has no DP: the guarantee is not applicable, and the page says so in words
    privacy = next(v for v in verdicts if v["area"] == "privacy-guarantee")
    assert privacy["status"] == "not applicable" and "No differential privacy" in privacy["sentence"]
    assert content["summary"]["verdicts"] == sorted(
        verdicts, key=lambda v: ["failed", "holds with caveat", "holds", "not applicable"].index(v["status"])
    )


def test_the_first_screen_names_the_settings_that_depart_from_the_defaults(hostile_run):
    # #29 reader study: a run with regressor.fit.epochs=3 read like a default run.
    from html import unescape

    st = json.loads(hostile_run.read("report.json"))["summary"]["settings"]
    header = hostile_run.read("report.html").decode().split("<main>", 1)[1].split("<section id=verdicts>", 1)[0]
    assert st["n_changed"] > 3 and st["statement"] in unescape(header) and "href='#settings'" in header
    assert {"data.tabular_csv", "data.target", "regressor.fit.epochs", "cnn.fit.epochs"} <= {
        c["key"] for c in st["changed"]
    }


def test_dp_wording_follows_the_runs_dp_level(hostile_run):
    # #29 reader study: "Ridge baseline (not DP)" in a run without DP read as if the other models had DP; a
    # user-level-DP model's card said "none (no DP)" and "trained without differential privacy".
    import copy

    from pipeline.report import model_card

    content = json.loads(hostile_run.read("report.json"))
    html = hostile_run.read("report.html").decode()
    assert not content["privacy"]["enabled"] and "not DP" not in html
    assert content["models"]["regressor"]["baseline"]["title"] == "Ridge baseline (scikit-learn)"
    dp = copy.deepcopy(content)
    dp["privacy"]["enabled"] = True  # positive control: in a DP run the Ridge row says it is outside the guarantee
    assert "Ridge baseline (not DP)" in str(report_html.render_section("summary", dp))
    dp["privacy"]["statement"] = "User-level differential privacy (DP-FedAvg) protects a whole client's data."
    for name in MODELS:
        dp["models"][name]["training"]["user_level_privacy"] = {"epsilon": 2.95, "delta": 1e-3}
    for name in MODELS:
        card = model_card.render(dp, name)
        assert "none (no DP)" not in card and "without differential privacy" not in card, name
        assert (
            "user-level DP-FedAvg at ε = 2.95" in card and "user-level DP-FedAvg (per client, not per record)" in card
        )
    assert "none (no DP)" in model_card.render(content, "cnn")  # the null: a run without DP says so


def _estimated_first_screen_lines(html):
    """Lines the page needs down to the last verdict row, at 1280 px: the header, the verdicts heading and note, and
    per row its tallest cell (characters per line of each column at the page's font sizes). An estimate for machines
    without a browser; the browser test measures it."""
    main = html.split("<main>", 1)[1]
    header, rest = main.split("</header>", 1)
    assert rest.startswith("<section id=verdicts>"), "the verdicts must come first after the header"
    section = rest.split("</section>", 1)[0]

    def text(fragment):
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()

    lines = 2 + -(-len(text(header)) // 130)  # h1 counts double
    lines += 2 + -(-len(text(section.split("<table", 1)[0])) // 130) + 1  # heading, note, table header
    for row in re.findall(r"<tr id=verdict-.*?</tr>", section):
        cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)
        status, area, numbers, sentence = (text(c) for c in cells[:4])
        shown = re.sub(r"<details.*?</details>", "", cells[2])  # folded numbers take one line: "N more"
        number_lines = max(1, len(re.findall(r"<span class=n>", shown))) + len(text(shown)) // 48
        number_lines += 1 if "<details" in cells[2] else 0
        lines += max(-(-len(status) // 18), -(-len(area) // 14), number_lines, -(-len(sentence) // 46)) + 0.5
    return lines


def test_the_first_screen_holds_every_verdict_by_element_order_and_line_budget(hostile_run):
    html = hostile_run.read("report.html").decode()
    assert html.count("<tr id=verdict-") == 7
    lines = _estimated_first_screen_lines(html)
    assert lines <= FIRST_SCREEN_PX[1] / 22, lines  # ~22 px a line at the page's font size


# Sets the title to "BOTTOM <px>": the lowest edge of any verdict row once the page has laid out.
ROW_PROBE = (
    "<script>addEventListener('load', () => { const b = [...document.querySelectorAll('tr[id^=verdict-]')]"
    ".map(r => r.getBoundingClientRect().bottom); document.title = 'BOTTOM ' + b.length + ' ' + "
    "Math.ceil(Math.max(...b)); });</script>"
)


@needs_chromium
def test_the_first_screen_holds_every_verdict_in_a_headless_browser(hostile_run, tmp_path):
    html = hostile_run.read("report.html").decode()
    _write_probe(html, ROW_PROBE, tmp_path / "probe.html")
    width, height = FIRST_SCREEN_PX
    dom = _chromium(
        f"--window-size={width},{height}", "--dump-dom", (tmp_path / "probe.html").as_uri(), profile=tmp_path
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    n, bottom = re.search(r"<title>BOTTOM (\d+) (\d+)</title>", dom.stdout).groups()
    assert int(n) == 7 and int(bottom) <= height, (n, bottom)
