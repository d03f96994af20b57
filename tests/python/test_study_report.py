"""A study's HTML report, as a person sees it: `cleanroom study lift
--report` against a running server, opened in headless Chromium (no
network), its plots found in the rendered DOM and a screenshot taken."""

import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import cleanroom_binary, credentials


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed for the report test (Debian: apt-get install chromium)")


def test_lift_report_renders_its_plots_in_headless_chromium(server, demo, tmp_path):
    report = tmp_path / "lift.html"
    env = {**os.environ, "CLEANROOM_PASSWORD": credentials(demo)["advertiser"]}
    run = subprocess.run(
        [str(cleanroom_binary()), "study", "lift", "--server", server.uri, "--party", "advertiser",
         "-p", "epsilon=0.75", "--report", str(report), "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert [r["test_group"] for r in rows] == ["control", "test"]
    assert "epsilon 0.75 is charged once" in run.stderr
    html = report.read_text()
    # Self-contained: nothing to fetch, no script (an SVG's xmlns is a name, not a fetch).
    assert not re.search(r'(src|href|url)\s*[=(]\s*["\']?https?://', html) and "<script" not in html and "<link" not in html

    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    dom = subprocess.run(browser + ["--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    for plot in ("lift-plot", "rate-plot", "budget-plot"):
        start = dom.stdout.index(f'<figure id="{plot}">')
        figure = dom.stdout[start:dom.stdout.index("</figure>", start)]
        assert "<svg" in figure and ("<rect" in figure or "<polyline" in figure), plot
    assert "Lift over the control group" in dom.stdout and "0.75" in dom.stdout
    shot = tmp_path / "lift.png"
    subprocess.run(browser + [f"--screenshot={shot}", "--window-size=1100,1900", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000, "the screenshot is blank"
    keep = os.environ.get("CLEANROOM_REPORT_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


@pytest.mark.parametrize(
    "kind, party, plots, text",
    [
        ("match_rate", "adnetwork", ("rate-plot", "budget-plot"), "impressions in conversions"),
        ("reach", "adnetwork", ("reach-plot", "frequency-plot", "overlap-plot", "budget-plot"), "People reached by channel"),
        ("attribution", "advertiser", ("attribution-plot-0", "attribution-plot-1", "attribution-plot-2", "budget-plot"), "Commission by channel"),
        ("cohorts", "advertiser", ("cohort-heatmap", "budget-plot"), "Active share of each cohort"),
    ],
)
def test_study_reports_render_their_plots_in_headless_chromium(server, demo, tmp_path, kind, party, plots, text):
    report = tmp_path / f"{kind}.html"
    env = {**os.environ, "CLEANROOM_PASSWORD": credentials(demo)[party]}
    run = subprocess.run(
        [str(cleanroom_binary()), "study", kind, "--server", server.uri, "--party", party, "--report", str(report), "--json"],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout), "the study printed no rows"
    dom = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    for plot in plots:
        start = dom.stdout.index(f'<figure id="{plot}">')
        assert "<rect" in dom.stdout[start:dom.stdout.index("</figure>", start)], plot
    assert text in dom.stdout
