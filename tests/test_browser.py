"""A real browser opens the saved dashboard offline: the plot renders and the console has no errors.

Headless Chromium (Debian's `chromium`) is installed by this test's set-up when missing (root +
apt-get); where it truly cannot be installed the test is skipped with the reason. Set
REVLENS_DASHBOARD_HTML to screenshot another dashboard, and REVLENS_WRITE_SCREENSHOT=1 to copy the
screenshot to docs/dashboard.png (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from test_paper import synthetic_report

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("Chromium is not installed and this user cannot apt-get install it")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, capture_output=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"Chromium could not be installed with apt-get: {err}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get ran but no chromium binary appeared")
    return found


def run_browser(binary: str, html: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [binary, *OFFLINE_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=10000", *extra,
           html.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


@pytest.mark.browser
def test_dashboard_renders_offline_in_chromium(tmp_path):
    binary = chromium()
    given = os.environ.get("REVLENS_DASHBOARD_HTML")
    html = Path(given) if given else synthetic_report().save_html(tmp_path / "dashboard.html")
    dom = run_browser(binary, html, tmp_path / "profile1", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="main-svg"') >= 2, "plotly did not render its SVG layers"
    assert "plotly-graph-div" in dom.stdout and "js-plotly-plot" in dom.stdout
    assert console_errors(dom.stderr) == [], console_errors(dom.stderr)
    png = tmp_path / "dashboard.png"
    shot = run_browser(binary, html, tmp_path / "profile2", f"--screenshot={png}", "--window-size=1300,2250",
                       "--hide-scrollbars")
    assert png.is_file() and png.stat().st_size > 20_000, shot.stderr[-2000:]
    assert console_errors(shot.stderr) == []
    if os.environ.get("REVLENS_WRITE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(png, ROOT / "docs" / "dashboard.png")


@pytest.mark.browser
def test_console_errors_are_detected(tmp_path):
    """The console check can fail: a page that throws is caught."""
    binary = chromium()
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    result = run_browser(binary, page, tmp_path / "profile", "--dump-dom")
    assert console_errors(result.stderr), result.stderr[-2000:]
