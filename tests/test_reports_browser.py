"""The demo's participant and group reports in a real browser (headless Debian Chromium).

A 4-participant demo (2 controls, 2 patients) goes through the real command line, participant then
group level; both reports are opened from file:// as a scientist opens them on a laptop.  The test
fails on a missing section, an image that does not load, a 3D view that does not come up, a
JavaScript error, or any request that leaves the machine.  Screenshots are saved in the test's
folder, and in $TRACTOSCALE_SCREENSHOTS when it is set.

Without chromium/chromedriver the test is skipped, except under CI (CI=true), where .ci/run installs
them and their absence is a failure.
"""
import os
import shutil
from pathlib import Path

import pytest

import browser
from conftest import run_cli

PARTICIPANT_SECTIONS = ["summary", "inputs", "mask", "dti", "odf", "gradient-check", "tractography", "qc",
                        "warnings", "parameters"]
GROUP_SECTIONS = ["participants", "target", "registration", "skeleton", "statistics", "bundles", "profiles",
                  "warnings", "parameters"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chromium():
    why = browser.available()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {why}")
        pytest.skip(why)
    with browser.Browser() as b:
        yield b


@pytest.fixture(scope="module")
def demo_reports(tmp_path_factory):
    from bids_app.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("report_demo")
    bids = make_demo_dataset(root / "bids", n_subjects=4, size="small", seed=3)
    out = root / "derivatives"
    run_cli(bids, out, "participant", "--odf-model", "csa", "--skip-bids-validation", "--nthreads", "2",
            "--no-progress", check=True)
    proc = run_cli(bids, out, "group", "--skip-bids-validation", "--tbss-quick", "--stats-column", "group",
                   "--n-permutations", "50", "--nthreads", "2", "--no-progress", check=True)
    assert "group report:" in proc.stdout
    return out


def _viewer_expected() -> bool:
    from bids_app.reports import viewer
    if viewer.installed_bundle() is None and os.environ.get("CI"):
        pytest.fail("CI must test the 3D view: `tractoscale install-viewer` (make test) did not install niivue")
    return viewer.installed_bundle() is not None


def _check(b: browser.Browser, page: Path, sections: list[str], shots: Path) -> dict:
    b.open(page)
    viewers = b.wait_viewers()
    found = b.sections()
    images = b.images()
    errors = b.js_errors()
    network = browser.network_requests(b.requests())
    shots.mkdir(parents=True, exist_ok=True)
    b.screenshot(shots / f"{page.stem}.png")
    extra = os.environ.get("TRACTOSCALE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / f"{page.stem}.png", Path(extra) / f"{page.stem}.png")
    assert found == sections, f"sections of {page.name}: {found}"
    broken = [i["src"] for i in images if not i["complete"] or i["width"] == 0]
    assert images and not broken, f"images that did not load in {page.name}: {broken}"
    assert not errors, f"JavaScript errors in {page.name}: {errors}"
    assert not network, f"{page.name} asked the network for {network}"
    return {"viewers": viewers, "images": images}


def test_participant_report_in_chromium(chromium, demo_reports, tmp_path):
    page = demo_reports / "sub-01.html"
    res = _check(chromium, page, PARTICIPANT_SECTIONS, tmp_path)
    srcs = {Path(i["src"]).name for i in res["images"]}
    for name in ("gradients", "mask", "maps", "odf", "streamlines"):
        assert f"sub-01_desc-{name}_report.png" in srcs
    assert "sub-01_desc-qc_dwimap.png" in srcs
    if _viewer_expected():
        assert [v["state"] for v in res["viewers"]] == ["ready"], res["viewers"]
        # the view really drew something: the canvas is not uniformly black
        assert chromium.driver.execute_script(
            "const c = document.querySelector('.viewer canvas'); const gl = c.getContext('webgl2');"
            "return c.width > 100 && c.height > 100 && gl !== null")
    else:
        assert res["viewers"] == []
        assert "niivue is not installed" in page.read_text()


def test_group_report_in_chromium(chromium, demo_reports, tmp_path):
    page = demo_reports / "group" / "report.html"
    res = _check(chromium, page, GROUP_SECTIONS, tmp_path)
    srcs = [i["src"] for i in res["images"]]
    assert "figures/desc-registration_report.png" in srcs and "figures/desc-skeleton_report.png" in srcs
    assert sum("desc-stat" in s for s in srcs) == 8                 # FA/MD/AD/RD x both contrasts
    assert sum(s.endswith("_bundles.png") for s in srcs) == 4       # one per participant
    assert any(s.endswith("_profiles.png") for s in srcs)
    if _viewer_expected():
        assert [v["state"] for v in res["viewers"]] == ["ready"], res["viewers"]
        # another participant's bundles load on demand
        chromium.driver.execute_script(
            "const s = document.querySelector('select.viewer-choice'); s.selectedIndex = 2;"
            "s.dispatchEvent(new Event('change'));")
        viewers = chromium.wait_viewers()
        assert viewers[0]["state"] == "ready" and viewers[0]["key"] == "sub-01"   # data-key is the first's
        assert "sub-03" in chromium.driver.execute_script(
            "return document.querySelector('select.viewer-choice').value")
        assert not chromium.js_errors()
        assert not browser.network_requests(chromium.requests())
