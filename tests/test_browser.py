"""A real user's view: JupyterLab in Debian's Chromium (Playwright, headless) runs notebook 01 cell
by cell, the codebook explorer's slider is dragged with the mouse, the plotly figure must change,
and after the notebook is saved and the page reloaded the figure must show the moved state again
(widget conventions in `docs/architecture.md` §4-5).

Why the reload used to fail ("Error displaying widget: model not found"), measured with the trace of
the kernel websocket this test keeps: the figures used to be plotly FigureWidgets, anywidgets whose
state carries plotly's whole 5 MB JavaScript bundle (``_esm``). After a reload, jupyterlab-manager
fetched every widget's state in one ``request_states`` reply: 20.4 MB for notebook 01's four
figures. Parsing it blocked the page's main thread for 2-4 s on a 2-core machine, and each widget
output waiting in ``get_model`` (which polls for at most 2 s and checks that deadline BEFORE looking
again, ipywidgets 8.1.9, issue 4026) gave up for good with "model not found"; anywidget 0.11 also
gives a model 2 s to import its bundle and then drops every later message, so a figure could stop
following its slider. q4lab's figures are now plain plotly figures shown through an
``ipywidgets.Output`` holding only the figure's JSON (``q4lab.widgets._common.LiveFigure``), so the
reply is a few hundred KB. The test does what a careful user does and waits for the machine at each
step (run a cell, wait until the kernel is idle and its widgets are drawn with data; drag; wait
until the kernel is idle; save; reload; wait), then checks the reloaded page twice: the figure shows
the moved state, and a second drag still changes it. Page and console errors, and a trace of the
kernel messages, are kept with any failure; "model not found" or an empty figure fails at once.

Screenshots go to artifacts/browser/ (git-ignored). Skips with the reason if /usr/bin/chromium or
playwright is missing (install: ``apt-get install -y chromium``).
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
NOTEBOOK = "01_why_4_bits_and_codebooks.ipynb"
STEP_TIMEOUT_S = 180

pytestmark = [pytest.mark.browser, pytest.mark.slow]

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")

FIGURE_JS = """() => {
  const gd = Array.from(document.querySelectorAll('.js-plotly-plot'))
    .find(g => ((g.layout && g.layout.title && g.layout.title.text) || '')
      .startsWith('NF4 at offset'));
  if (!gd || !gd.data) return null;
  const nf4 = (gd._fullData || gd.data).find(t => t.name === 'NF4');  // decoded arrays
  return {title: gd.layout.title.text, nf4: nf4 ? Array.from(nf4.x) : null, traces: gd.data.length};
}"""
KERNEL_JS = """async () => {
  const w = window.jupyterapp.shell.currentWidget;
  if (!w || !w.sessionContext) return 'no notebook';
  await w.context.ready;
  await w.sessionContext.ready;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  if (!kernel) return 'no kernel';
  return kernel.connectionStatus === 'connected' ? kernel.status : kernel.connectionStatus;
}"""
CODE_CELLS_JS = """() => window.jupyterapp.shell.currentWidget.content.widgets
  .map((c, i) => [i, c.model.type]).filter(([i, t]) => t === 'code').map(([i]) => i)"""
RUN_CELL_JS = """async (i) => {
  const panel = window.jupyterapp.shell.currentWidget;
  panel.content.activeCellIndex = i;
  await window.jupyterapp.commands.execute('notebook:run-cell');
}"""
# The widgets of cell i (or of the whole notebook): how many outputs still wait for a model, how
# many failed, and the number of traces of every plotly figure (0 = a figure that never got data).
WIDGETS_JS = """(i) => {
  const panel = window.jupyterapp.shell.currentWidget;
  const root = i === null ? panel.content.node : panel.content.widgets[i].node;
  const outputs = Array.from(root.querySelectorAll('.jp-OutputArea-output')).map(e => e.innerText);
  return {
    loading: outputs.filter(t => t.includes('Loading widget')).length,
    failed: outputs.filter(t => t.includes('Error displaying widget')).map(t => t.slice(0, 120)),
    figures: Array.from(root.querySelectorAll('.js-plotly-plot')).map(g => (g.data || []).length),
  };
}"""
OUTPUTS_JS = """() => Array.from(document.querySelectorAll('.jp-OutputArea-output'))
  .map(e => e.innerText).join('\\n')"""


def saved_outputs(path: Path) -> str:
    """All stream/text outputs of the notebook file on disk (not its sources)."""
    import nbformat

    nb = nbformat.read(path, 4)
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab over a temp root holding a copy of notebook 01; yields (base_url, token, root)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    with jupyter_lab(root, Q4LAB_FAST="1") as (base, token):
        yield base, token, root


class Page:
    """The Playwright page plus what went wrong in it (uncaught errors, console errors)."""

    def __init__(self, page):
        self.page, self.errors, self.trace, self.t0 = page, [], [], time.time()
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: m.type == "error" and
                self.errors.append(f"console error: {m.text[:300]}"))
        page.on("websocket", lambda ws: (ws.on("framesent", lambda f: self.frame("sent", f)),
                                         ws.on("framereceived", lambda f: self.frame("recv", f))))

    def frame(self, direction: str, payload) -> None:
        """One line per kernel message (type, widget method, size) for
        artifacts/browser/trace.log."""
        text = payload if isinstance(payload, str) else payload[:4096].decode("utf-8", "replace")
        kind = re.findall(r'"msg_type": ?"(\w+)"', text[:4096])
        if kind and kind[0] != "status":
            method = re.findall(r'"method": ?"(\w+)"', text[:4096])
            self.note(f"{direction} {kind[0]} {method[:1]} {len(payload)} bytes")

    def note(self, text: str) -> None:
        self.trace.append(f"{time.time() - self.t0:8.2f} {text}")

    def save_trace(self) -> None:
        (ARTIFACTS / "trace.log").write_text("\n".join(self.trace + self.errors) + "\n")

    def evaluate(self, js, arg=None):
        return self.page.evaluate(js, arg)

    def wait_until(self, predicate, what: str, timeout_s: float = STEP_TIMEOUT_S):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = predicate()
            if value:
                return value
            self.page.wait_for_timeout(250)
        self.page.screenshot(path=str(ARTIFACTS / "timeout.png"))
        errors = "\n".join(self.errors[-20:]) or "(no page or console errors)"
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; "
                             f"widgets: {self.evaluate(WIDGETS_JS, None)}\n{errors}")

    def wait_for_idle_kernel(self, what: str) -> None:
        self.wait_until(lambda: self.evaluate(KERNEL_JS) == "idle", f"an idle kernel ({what})")

    def wait_for_widgets(self, cell, what: str) -> dict:
        """Until no output of ``cell`` (None: the whole notebook) waits for its widget model and
        every plotly figure in it holds data; "model not found" fails at once."""
        def drawn():
            state = self.evaluate(WIDGETS_JS, cell)
            assert not state["failed"], f"{what}: {state['failed']}\n" + "\n".join(self.errors)
            return state if state["loading"] == 0 and all(state["figures"]) else None
        return self.wait_until(drawn, f"the widgets of {what} to be drawn with data")


def open_notebook(page: Page) -> None:
    page.page.wait_for_function(
        "() => window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=90_000)
    page.wait_for_idle_kernel("notebook opened")


def test_slider_changes_figure_and_survives_reload(lab):
    base, token, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    url = f"{base}/lab/workspaces/t{uuid.uuid4().hex[:8]}/tree/{NOTEBOOK}?reset&token={token}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = Page(browser.new_page(viewport={"width": 1400, "height": 1000}))
        try:
            run_drag_reload_drag(page, url, root)
        finally:
            page.save_trace()
            browser.close()


def run_drag_reload_drag(page: Page, url: str, root: Path) -> None:
    """Run notebook 01 cell by cell, drag, save, reload, check the restored figure, drag again."""
    page.page.goto(url)
    open_notebook(page)
    dismiss_news_prompt(page.page)
    for i in page.evaluate(CODE_CELLS_JS):
        page.evaluate(RUN_CELL_JS, i)
        page.wait_for_idle_kernel(f"cell {i} ran")
        page.wait_for_widgets(i, f"cell {i}")
    assert "01 checks passed" in page.evaluate(OUTPUTS_JS), "notebook 01's closing check"
    before = page.wait_until(lambda: figure_state(page), "the codebook figure")
    assert before["title"].startswith("NF4 at offset 0.9677083") and before["nf4"], before
    page.page.screenshot(path=str(ARTIFACTS / "01_ran.png"))

    drag_offset_slider(page.page)
    after = page.wait_until(lambda: (s := figure_state(page)) and s["nf4"] != before["nf4"]
                            and s["title"] != before["title"] and s,
                            "the figure's levels and title to change after the drag")
    assert len(after["nf4"]) == 16 and "differs from the shipped" in after["title"], after
    page.wait_for_idle_kernel("the drag was handled")
    assert figure_state(page) == after, "the figure changed again after the kernel went idle"
    screenshot_figure(page.page, "02_figure_after_drag.png")
    # JupyterLab keeps outputs only in a saved notebook: save, then reload the page. The widget
    # views in the saved outputs reconnect to the still-running kernel's widget models.
    page.evaluate("async () => { await window.jupyterapp.commands.execute('docmanager:save'); }")
    page.wait_until(lambda: "01 checks passed" in saved_outputs(root / NOTEBOOK),
                    "the saved notebook on disk to hold the outputs")

    page.note("reload")
    page.page.reload()
    open_notebook(page)
    page.wait_for_widgets(None, "the reloaded notebook")
    reloaded = page.wait_until(lambda: figure_state(page), "the figure after the reload")
    screenshot_figure(page.page, "03_figure_after_reload.png")
    assert reloaded["nf4"] == after["nf4"], "figure state lost on reload"
    assert reloaded["title"] == after["title"]

    drag_offset_slider(page.page, dx=60)     # the reloaded page still talks to the kernel
    again = page.wait_until(lambda: (s := figure_state(page)) and s["nf4"] != reloaded["nf4"]
                            and s, "the figure to change after a drag on the reloaded page")
    assert len(again["nf4"]) == 16 and again["title"] != reloaded["title"], again
    screenshot_figure(page.page, "04_figure_after_reload_and_drag.png")
    page.wait_for_idle_kernel("the second drag was handled")
    model_errors = [e for e in page.errors if "anywidget" in e or "model not found" in e]
    print(f"browser: {len(page.errors)} console/page errors, widget-related: {model_errors}")


def figure_state(page: Page):
    return page.evaluate(FIGURE_JS)


def screenshot_figure(page, name: str) -> None:
    """Screenshot of the codebook explorer's plotly figure (scrolled into view)."""
    fig = page.locator(".js-plotly-plot", has_text="NF4 at offset").first
    fig.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    fig.screenshot(path=str(ARTIFACTS / name))


def dismiss_news_prompt(page) -> None:
    """Answer JupyterLab's 'notified about official Jupyter news?' toast (it covers the page)."""
    no = page.locator(".jp-toast-button", has_text="No")
    if no.count():
        no.first.click()


def drag_offset_slider(page, dx: float = -120) -> None:
    """Drag the 'NF4 offset' slider's handle ``dx`` px (default: 120 px left) with the mouse."""
    slider = page.locator(".widget-slider", has_text="NF4 offset").first
    handle = slider.locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    box = handle.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y, steps=5)
    page.mouse.move(x + dx, y, steps=5)
    page.mouse.up()
