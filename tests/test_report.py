"""`pairfree report` on hostile run folders: NaN, infinite and missing losses, empty metrics,
and HTML in a run's name, config, metric names and evaluation tables. The page is written, its
embedded JSON is strict, and in headless Chromium no injected script runs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pairfree.cli import main

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
# each payload sets window.pwned (and the page's title) if it ever runs
SCRIPT = "<script>window.pwned = 1; document.title = 'pwned'</script>"
IMAGE = "<img src=x onerror=\"window.pwned = 2; document.title = 'pwned'\">"
SVG = '<svg onload="window.pwned = 3"></svg>'
ATTRIBUTE = '" onmouseover="window.pwned = 4" x="'


def write_run(folder: Path, *, config: dict, metrics: str, run: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    # a hand-made or foreign config may hold NaN (Python's json writes it unless told not to)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "metrics.jsonl").write_text(metrics, encoding="utf-8")
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run), encoding="utf-8")
    return folder


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    hostile = write_run(
        tmp_path / IMAGE.replace("/", ""),  # a folder name may hold all of it but "/"
        config={
            "recipe": SCRIPT,
            "train": {"seed": float("nan"), "lr": float("inf"), "note": IMAGE},
        },  # fmt: skip
        metrics="\n".join(
            [
                '{"step": 1, "loss": NaN}',
                '{"step": 2, "loss": Infinity, "' + SCRIPT.replace('"', "'") + '_loss": 1.0}',
                '{"step": 3, "loss": null}',
                '{"step": 4, "loss": 2.5}',
                '{"step": 4, "eval": {"val_loss": NaN, "CIDEr": null, "BLEU_4": -Infinity, '
                '"'
                + ATTRIBUTE.replace('"', "'")
                + '": 1.0, "note": "'
                + SVG.replace('"', "'")
                + '"}}',
                '{"step": 5, "eval": {}}',
            ]
        )
        + "\n",  # fmt: skip
        run={
            "sessions": [
                {"command": ["pairfree", SCRIPT], "wall_s": float("nan"), "versions": {IMAGE: SVG}}
            ]
        },  # fmt: skip
    )
    (hostile / f"metrics_{IMAGE.replace('/', '')}.md").write_text(
        f"| method | {SCRIPT} |\n|---|---|\n| {IMAGE} | {SVG} |\n- {SCRIPT}\n", encoding="utf-8"
    )
    empty = write_run(tmp_path / "empty", config={}, metrics="")
    only_evals = write_run(tmp_path / "evals", config={"train": {}},
                           metrics='{"step": 1, "eval": {"CIDEr": NaN}}\n')  # fmt: skip
    return [hostile, empty, only_evals]


def test_a_report_of_nan_losses_empty_metrics_and_html_everywhere_is_written(runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out), "--title", IMAGE]) == 0
    page = out.read_text(encoding="utf-8")
    for payload in (SCRIPT, IMAGE, SVG, 'onmouseover="window'):
        assert payload not in page, payload
    assert "&lt;script&gt;" in page and "&lt;img src=x onerror" in page
    # the config is shown as strict JSON: no NaN or Infinity (null, as every pairfree JSON)
    configs = re.findall(r"<pre>(.*?)</pre>", page, flags=re.S)
    assert len(configs) == 3
    for shown in configs:
        text = shown.replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
        json.loads(text.replace("&#x27;", "'").replace("&amp;", "&"),
                   parse_constant=lambda c: pytest.fail(f"{c} in the page's JSON"))  # fmt: skip
    assert "NaN" not in page and "Infinity" not in page
    assert page.count("<svg") >= 2  # the finite loss and the one finite metric still drawn


@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/setup.sh installs it)")
def test_no_injected_script_runs_in_a_browser(runs, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out), "--title", f"runs {SCRIPT}"]) == 0
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=BROWSER, args=["--no-sandbox"])
        page = browser.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(out.as_uri())
        page.wait_for_load_state("load")
        page.wait_for_timeout(300)  # an <img onerror> fires after the failed load
        page.evaluate("""document.querySelectorAll('*').forEach(e => e.dispatchEvent(
            new MouseEvent('mouseover', {bubbles: true})))""")  # an injected handler runs now
        assert page.evaluate("window.pwned") is None
        assert page.title() == f"runs {SCRIPT}"  # shown as text, not run
        assert page.locator("script").count() == 0 and dialogs == []
        assert page.locator("h2", has_text="<img src=x onerror").count() == 1
        browser.close()


@pytest.mark.parametrize("line", ["[1, 2]", '{"loss": 1.0}', '{"step": 2, "eval": 3}', "7"])
def test_a_metrics_line_that_is_no_record_is_named(tmp_path, capsys, line):
    run = write_run(tmp_path / "run", config={"train": {}},
                    metrics=f'{{"step": 1, "loss": 2.0}}\n{line}\n{{"step": 3, "loss": 1.0}}\n')  # fmt: skip
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl:2" in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()
