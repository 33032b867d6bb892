"""The quality lab and notebook 12 ("The 4-bit landscape") as a user sees them: JupyterLab in
Debian's Chromium (Playwright, headless) runs notebooks/12_the_4bit_landscape.ipynb top to bottom
at full size (it opens ``widgets.quality_lab`` on the real SmolLM2 and presses "every format"),
then the "FP4" codebook button is clicked with the mouse. Checked in the page: the notebook's
closing checks pass; the landscape plot holds one point per format of ``q4lab.quant_types`` that
has a quantizer (``q4lab.landscape.registry_specs``) and the equal-bits pairs; the table shows
every format with its KL and top-1 columns; the click adds a point to the "perplexity vs
bits/param" scatter; and no error anywhere (no traceback, no widget that failed to display, no
uncaught page error).

One JupyterLab and one SmolLM2 serve both the notebook and the widget (notebook 12's lab IS the
widget), so the suite pays for one browser run, not two. Screenshots go to artifacts/browser/
(git-ignored): landscape_1_ran.png (the page), landscape_2_plot.png (the every-format plot),
landscape_3_table.png (the table), landscape_4_kinds.png (the layer kinds ranked),
quality_lab_2_after_fp4.png, quality_lab_3_scatter.png, quality_lab_4_widget.png. Skips with the
reason if /usr/bin/chromium or playwright is missing (install: ``apt-get install -y chromium``).
The set-up follows tests/test_browser.py (a private JupyterLab on a free port with a random
token, a fresh workspace); widget conventions: ``docs/architecture.md`` §4-5.
"""
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
from jupyterlab_server import CHROMIUM, CHROMIUM_ARGS, jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"
NOTEBOOK = "12_the_4bit_landscape.ipynb"
SWEEP = Path("bench") / "results" / "sweep_formats_cpu.json"   # read by the closing cell

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

# The plotly figure whose title starts with ``prefix``: its title and the labels of its points.
FIGURE_JS = """(prefix) => {
  const gd = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(g => ((g.layout && g.layout.title && g.layout.title.text) || '').startsWith(prefix));
  if (!gd || !gd.data) return null;
  // a point's label: its text, or (where the scatter hides it for room) customdata[i][0]
  const pts = gd.data.filter(t => (t.mode || '').includes('text'))
    .flatMap(t => Array.from(t.text || []).map((s, i) => s ||
      (t.customdata && t.customdata[i] ? String(t.customdata[i][0]) : '')));
  return {title: gd.layout.title.text, points: pts, traces: gd.data.map(t => t.name)};
}"""
KERNEL_READY_JS = """async () => {
  const w = window.jupyterapp.shell.currentWidget;
  await w.context.ready;
  await w.sessionContext.ready;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return kernel ? kernel.status : 'no kernel';
}"""
OUTPUTS_JS = """() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))
  .map(e => e.innerText).join('\\n')"""
ERROR_MARKERS = ("Traceback", "Error displaying widget", "failed:", "Error:")
SCATTER = "perplexity vs bits/param"
LANDSCAPE = "every 4-bit format"


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab over a temp root holding notebooks/<notebook 12> and the sweep record its last
    cell reads (../bench/results/); yields (base_url, token)."""
    root = tmp_path_factory.mktemp("qlab")
    (root / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / "notebooks" / NOTEBOOK)
    (root / SWEEP).parent.mkdir(parents=True)
    shutil.copy(ROOT / SWEEP, root / SWEEP)
    with jupyter_lab(root) as server:
        yield server


def wait_until(page, predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / "quality_lab_timeout.png"), full_page=True)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; outputs:\n"
                         f"{page.evaluate(OUTPUTS_JS)[-3000:]}")


def page_errors(page) -> list[str]:
    text = page.evaluate(OUTPUTS_JS)
    return [m for m in ERROR_MARKERS if m in text]


def expected_labels() -> list[str]:
    from q4lab import landscape

    return [s.label for s in landscape.registry_specs()]


def test_notebook_12_and_the_lab_in_the_browser(lab_server):
    base, token = lab_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = (f"{base}/lab/workspaces/q{uuid.uuid4().hex[:8]}/tree/notebooks/{NOTEBOOK}"
           f"?reset&token={token}")
    uncaught = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1700})
        page.on("pageerror", lambda exc: uncaught.append(str(exc)))
        try:
            run_notebook_then_click(page, url)
        finally:
            browser.close()
    assert not uncaught, uncaught


def run_notebook_then_click(page, url: str) -> None:
    """Run notebook 12, check its plot and table, click "FP4", check the scatter."""
    page.goto(url)
    page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook')",
                           timeout=90_000)
    wait_until(page, lambda: page.evaluate(KERNEL_READY_JS) == "idle", 90, "an idle kernel")
    no = page.locator(".jp-toast-button", has_text="No")  # the "Jupyter news?" toast
    if no.count():
        no.first.click()
    page.evaluate("async () => { await window.jupyterapp.commands.execute("
                  "'notebook:run-all-cells'); }")
    wait_until(page, lambda: "all checks passed" in page.evaluate(OUTPUTS_JS) or page_errors(page),
               900, "notebook 12 to finish ('all checks passed')")
    assert not page_errors(page), page.evaluate(OUTPUTS_JS)[-3000:]
    wait_until(page, lambda: page.evaluate(KERNEL_READY_JS) == "idle", 60, "an idle kernel")

    expected = expected_labels()
    plot = wait_until(page, lambda: page.evaluate(FIGURE_JS, LANDSCAPE), 60, "the landscape plot")
    assert sorted(plot["points"]) == sorted(expected), plot
    assert "equal bits: NF4+DQ/64 vs NF4/256" in plot["traces"], plot
    outputs = page.evaluate(OUTPUTS_JS)
    assert "KL (nats)" in outputs and "top-1 agreement" in outputs, outputs[-3000:]
    assert all(label in outputs for label in expected), outputs[-3000:]
    page.screenshot(path=str(ARTIFACTS / "landscape_1_ran.png"), full_page=True)
    screenshot(page, ".js-plotly-plot", LANDSCAPE, "landscape_2_plot.png")
    # the tables by their captions (a tqdm bar's text starts the same way)
    screenshot(page, ".widget-html", re.compile(LANDSCAPE + r": \d+ tokens"),
               "landscape_3_table.png")
    screenshot(page, ".widget-html", "most sensitive first", "landscape_4_kinds.png")

    before = wait_until(page, lambda: page.evaluate(FIGURE_JS, SCATTER), 60, "the scatter")
    assert "FP4+DQ/64" not in before["points"] and "NF4+DQ/64" in before["points"], before
    button = page.locator(".widget-toggle-button", has_text=re.compile(r"^\s*FP4\s*$")).first
    button.scroll_into_view_if_needed()
    button.click()
    after = wait_until(page, lambda: (s := page.evaluate(FIGURE_JS, SCATTER)) and
                       "FP4+DQ/64" in s["points"] and s, 600, "the scatter to gain FP4+DQ/64")
    assert sorted(after["points"]) == sorted(before["points"] + ["FP4+DQ/64"]), after
    n = len(before["points"]) + 1
    assert after["title"].startswith(f"{SCATTER}: {n} configurations"), after
    wait_until(page, lambda: "FP4+DQ/64" in str(page.locator(".widget-html").all_inner_texts()),
               60, "the readout to show FP4+DQ/64")
    page.wait_for_timeout(1000)
    page.screenshot(path=str(ARTIFACTS / "quality_lab_2_after_fp4.png"), full_page=True)
    widget = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot")).first
    widget.scroll_into_view_if_needed()
    widget.screenshot(path=str(ARTIFACTS / "quality_lab_4_widget.png"))
    screenshot(page, ".js-plotly-plot", SCATTER, "quality_lab_3_scatter.png")
    assert not page_errors(page), page.evaluate(OUTPUTS_JS)[-3000:]


def screenshot(page, selector: str, text: str, name: str) -> None:
    """Screenshot of the first ``selector`` element containing ``text``, scrolled into view."""
    element = page.locator(selector, has_text=text).first
    element.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    element.screenshot(path=str(ARTIFACTS / name))
