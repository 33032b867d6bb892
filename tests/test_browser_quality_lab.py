"""The quality lab as a user sees it: JupyterLab in Debian's Chromium (Playwright, headless) runs a
notebook that opens ``widgets.quality_lab`` on the real SmolLM2, the "FP4" codebook button is
clicked with the mouse, and the "perplexity vs bits/param" scatter must gain a point, with no error
anywhere in the page (no traceback, no widget that failed to display, no uncaught page error).

Screenshots go to artifacts/browser/ (git-ignored): quality_lab_1_opened.png,
quality_lab_2_after_fp4.png, quality_lab_3_scatter.png, quality_lab_4_widget.png. Skips with the
reason if /usr/bin/chromium or playwright is missing (install: ``apt-get install -y chromium``). The
set-up follows tests/test_browser.py (a private JupyterLab on a free port with a random token, a
fresh workspace); widget conventions: ``docs/architecture.md`` §4-5.
"""
import os
import time
import uuid
from pathlib import Path

import pytest
from jupyterlab_server import CHROMIUM, CHROMIUM_ARGS, jupyter_lab

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts" / "browser"
NOTEBOOK = "quality_lab.ipynb"
CELLS = ["from q4lab import widgets\nlab = widgets.quality_lab(tokens=64, new_tokens=2)\nlab",
         "print('lab ready', len(lab.history))"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
nbformat = pytest.importorskip("nbformat")

SCATTER_JS = """() => {
  const gd = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(g => ((g.layout && g.layout.title && g.layout.title.text) || '')
      .startsWith('perplexity vs bits/param'));
  if (!gd || !gd.data) return null;
  const pts = gd.data.filter(t => ['NF4', 'FP4', 'INT4'].includes(t.name))
    .flatMap(t => Array.from(t.text || []));
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


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab over a temp root holding the two-cell notebook; yields (base_url, token)."""
    root = tmp_path_factory.mktemp("qlab")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, root / NOTEBOOK)
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
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def page_errors(page) -> list[str]:
    text = page.evaluate(OUTPUTS_JS)
    return [m for m in ERROR_MARKERS if m in text]


def test_fp4_button_adds_a_point_without_errors(lab_server):
    base, token = lab_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = f"{base}/lab/workspaces/q{uuid.uuid4().hex[:8]}/tree/{NOTEBOOK}?reset&token={token}"
    uncaught = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1700})  # the whole lab fits
        page.on("pageerror", lambda exc: uncaught.append(str(exc)))
        page.goto(url)
        page.wait_for_function("() => window.jupyterapp && document.querySelector('.jp-Notebook')",
                               timeout=90_000)
        wait_until(page, lambda: page.evaluate(KERNEL_READY_JS) == "idle", 90, "an idle kernel")
        no = page.locator(".jp-toast-button", has_text="No")  # the "Jupyter news?" toast
        if no.count():
            no.first.click()
        page.evaluate("async () => { await window.jupyterapp.commands.execute("
                      "'notebook:run-all-cells'); }")
        wait_until(page, lambda: "lab ready 1" in page.evaluate(OUTPUTS_JS) or page_errors(page),
                   900, "the lab to open ('lab ready 1')")
        assert not page_errors(page), page.evaluate(OUTPUTS_JS)[-3000:]
        before = wait_until(page, lambda: page.evaluate(SCATTER_JS), 60, "the scatter")
        assert before["points"] == ["NF4+DQ/64"], before
        assert {"Pareto front", "current"} <= set(before["traces"])
        page.screenshot(path=str(ARTIFACTS / "quality_lab_1_opened.png"), full_page=True)

        button = page.locator(".widget-toggle-button", has_text="FP4").first
        button.scroll_into_view_if_needed()
        button.click()
        after = wait_until(page, lambda: (s := page.evaluate(SCATTER_JS)) and
                           len(s["points"]) == 2 and s, 600, "the scatter to gain a point")
        assert sorted(after["points"]) == ["FP4+DQ/64", "NF4+DQ/64"], after
        assert after["title"].startswith("perplexity vs bits/param: 2 configurations")
        wait_until(page, lambda: "FP4+DQ/64" in page.locator(".widget-html").all_inner_texts()
                   .__str__(), 60, "the readout to show FP4+DQ/64")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "quality_lab_2_after_fp4.png"), full_page=True)
        widget = page.locator(".jp-OutputArea-output", has=page.locator(".js-plotly-plot")).first
        widget.scroll_into_view_if_needed()
        widget.screenshot(path=str(ARTIFACTS / "quality_lab_4_widget.png"))
        fig = page.locator(".js-plotly-plot", has_text="perplexity vs bits/param").first
        fig.scroll_into_view_if_needed()
        fig.screenshot(path=str(ARTIFACTS / "quality_lab_3_scatter.png"))
        assert not page_errors(page), page.evaluate(OUTPUTS_JS)[-3000:]
        assert not uncaught, uncaught
        browser.close()
