"""A real browser opens the saved dashboard offline: the plot renders, the console has no errors, and at
real depth (32 layers) every panel of the screenshot holds a drawing, nothing is cut off, and the page
has no blank stretch.

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

from dashboard_reports import deep_report, figure_geometry

ROOT = Path(__file__).resolve().parent.parent
OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--enable-logging=stderr",
    "--v=0",
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
    cmd = [
        binary,
        *OFFLINE_FLAGS,
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *extra,
        html.resolve().as_uri(),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


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
    found = re.search(r'"height":\s*(\d+)', html.read_text())  # the figure's own height: screenshot all of it
    window_h = int(found.group(1)) + 16 if found else 2250
    shot = run_browser(
        binary,
        html,
        tmp_path / "profile2",
        f"--screenshot={png}",
        f"--window-size=1300,{window_h}",
        "--hide-scrollbars",
    )
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


BODY_MARGIN = 8  # the page's default <body> margin around the figure
WINDOW_W = 1300


def _ink(pixels, box, background) -> float:
    """Fraction of pixels in ``box`` that differ from the background colour."""
    import numpy as np

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    region = pixels[max(y0, 0) : y1, max(x0, 0) : x1].astype(int)
    if region.size == 0:
        return 0.0
    return float(np.mean(np.abs(region - np.asarray(background)).sum(axis=-1) > 30))


@pytest.mark.browser
@pytest.mark.parametrize("blocking", [pytest.param(True, marks=pytest.mark.slow), False])
def test_deep_dashboard_screenshot_has_every_panel_drawn_and_no_blank_space(tmp_path, blocking):
    np = pytest.importorskip("numpy")
    image = pytest.importorskip("PIL.Image")
    binary = chromium()
    report = deep_report(32, 3, blocking=blocking)
    fig = report.dashboard(theme="light")
    html = report.save_html(tmp_path / "deep.html")
    height = int(fig.layout.height)
    png = tmp_path / "deep.png"
    shot = run_browser(
        binary,
        html,
        tmp_path / "profile",
        f"--screenshot={png}",
        f"--window-size={WINDOW_W},{height + 2 * BODY_MARGIN}",
        "--hide-scrollbars",
    )
    assert png.is_file(), shot.stderr[-2000:]
    assert console_errors(shot.stderr) == []
    pixels = np.asarray(image.open(png).convert("RGB"))
    assert pixels.shape[0] >= height
    background = (255, 255, 255)
    geo = figure_geometry(fig, width=WINDOW_W - 2 * BODY_MARGIN)
    shift = lambda b, pad=6: (  # noqa: E731
        b[0] + BODY_MARGIN + pad,
        b[1] + BODY_MARGIN + pad,  # noqa: E731
        b[2] + BODY_MARGIN - pad,
        b[3] + BODY_MARGIN - pad,
    )
    # Every panel holds a drawing (lines, bars, boxes or heat), not just an empty frame.
    for ref, box in geo["panels"].items():
        assert _ink(pixels, shift(box), background) > 0.01, f"panel {ref} is empty in the screenshot"
    # Every subplot title is rendered where the figure JSON puts it.
    for text, box in geo["titles"]:
        assert _ink(pixels, shift(box, pad=0), background) > 0.005, f"title {text!r} is missing"
    # The title and the legend are drawn in the band above the panels, below the modebar's strip.
    top = min(b[1] for b in geo["panels"].values())
    assert _ink(pixels, (BODY_MARGIN, BODY_MARGIN + 36, WINDOW_W // 2, BODY_MARGIN + 80), background) > 0.01
    assert _ink(pixels, (BODY_MARGIN, BODY_MARGIN + 90, WINDOW_W - 100, BODY_MARGIN + top - 40), background) > 0.005
    # No blank stretch: every 150 px band of the figure has some ink, down to its last panel.
    bottom = max(b[3] for b in geo["panels"].values()) + BODY_MARGIN
    for y in range(BODY_MARGIN, int(bottom) - 150, 150):
        assert _ink(pixels, (BODY_MARGIN, y, WINDOW_W - BODY_MARGIN, y + 150), background) > 0.003, y
    # The low-SNR veil: the heatmap's first three columns are grey, the others coloured.
    heat = next(t for t in fig.data if t.type == "heatmap")
    hx0, hy0, hx1, hy1 = shift(geo["panels"][(heat.xaxis, heat.yaxis)], pad=0)
    col_w = (hx1 - hx0) / report.n_layers
    mid = int((hy0 + hy1) / 2)
    grey = pixels[mid, int(hx0 + 1.5 * col_w)].astype(int)
    hot = pixels[mid, int(hx0 + (report.best_layer_index() + 0.5) * col_w)].astype(int)
    assert np.ptp(grey) < 20 and grey.mean() < 235, grey  # neutral grey
    assert hot[2] - hot[0] > 40, hot  # blue: positive alignment
