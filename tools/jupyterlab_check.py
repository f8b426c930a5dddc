"""Run one notebook in JupyterLab in a real (headless) browser and print what its user would see: the run's
length, progress bars drawn as widgets or "IProgress not found" warnings, tracebacks, and the last output.

Not part of `make test` (it needs a Chromium and the playwright package, neither a project dependency):

    pip install playwright            # into any environment; a Chromium from your system package manager will do
    .venv/bin/jupyter lab notebooks/ --no-browser --port 8899 --ServerApp.token=check &
    python tools/jupyterlab_check.py 01_inference.ipynb --token check --chromium "$(command -v chromium)" --shot lab01.png
"""
import argparse
import time

from playwright.sync_api import sync_playwright

WIDGET_OUTPUT = ".jp-OutputArea-output .widget-hprogress"  # a tqdm bar drawn by ipywidgets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebook", help="a notebook in the folder JupyterLab serves")
    parser.add_argument("--url", default="http://127.0.0.1:8899")
    parser.add_argument("--token", required=True)
    parser.add_argument("--chromium", help="a Chromium executable (default: playwright's own)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the run")
    parser.add_argument("--shot", help="save a screenshot of the end of the notebook here")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # A fresh workspace, so that only this notebook is open.
        page.goto(f"{args.url}/lab/workspaces/check/tree/{args.notebook}?reset&token={args.token}")
        notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
        notebook.wait_for(timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
        page.click("text=Run", timeout=10_000)  # the menu bar
        page.click("text=Run All Cells", timeout=10_000)
        started = time.time()
        time.sleep(5)
        running = notebook.locator(".jp-InputPrompt:has-text('[*]')")
        while running.count() and time.time() - started < args.timeout:
            time.sleep(5)
        text = notebook.inner_text()
        outputs = notebook.locator(".jp-OutputArea-output")
        print(f"{args.notebook}: {time.time() - started:.0f} s; cells still running {running.count()}")
        print(f"'IProgress not found' warnings: {text.count('IProgress not found')}; tracebacks: "
              f"{text.count('Traceback')}; progress bars drawn as widgets: "
              f"{notebook.locator(WIDGET_OUTPUT).count()}")
        if outputs.count():
            print("last output:\n" + outputs.nth(outputs.count() - 1).inner_text()[:1000])
        if args.shot:
            page.screenshot(path=args.shot)
        browser.close()


if __name__ == "__main__":
    main()
