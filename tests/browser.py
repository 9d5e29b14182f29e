"""Headless Chromium (Debian's chromium + chromium-driver) driven through Selenium, for the report tests.

Every page is opened from ``file://`` as a scientist would open it from a laptop.  ``check_page``
collects what the tests assert on: the sections, every image's load state, the 3D viewers' states,
JavaScript errors (console errors and uncaught exceptions) and any request that is not to a local
``file:``/``data:``/``blob:`` address (a network request).
"""
from __future__ import annotations

import base64
import shutil
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:")

# background networking off: Chromium must not reach out by itself (and this machine has no network)
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--metrics-recording-only",
         "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
         "--window-size=1280,900", "--allow-file-access-from-files")


def available() -> str | None:
    """None when the browser can run here, else why not."""
    if not CHROMIUM:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if not CHROMEDRIVER:
        return "chromedriver is not installed (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[test])"
    return None


class Browser:
    def __init__(self):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self._profile = tempfile.mkdtemp(prefix="tractoscale-chromium-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = CHROMIUM
        for f in FLAGS:
            opts.add_argument(f)
        opts.add_argument(f"--user-data-dir={self._profile}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
        self.driver.set_page_load_timeout(120)
        self.driver.set_script_timeout(120)

    def close(self):
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ one page
    def open(self, path: Path):
        self.driver.get_log("browser")
        self.driver.get_log("performance")
        self.driver.get(Path(path).resolve().as_uri())

    def wait_viewers(self, timeout: float = 90) -> list[dict]:
        """Wait until every 3D viewer left the pending/loading states; return their states."""
        from selenium.webdriver.support.ui import WebDriverWait
        js = ("return Array.from(document.querySelectorAll('.viewer')).map(v => ({state: v.dataset.state,"
              " key: v.dataset.key, status: (v.parentNode.querySelector('.viewer-status') || {}).textContent}))")
        WebDriverWait(self.driver, timeout, poll_frequency=0.5).until(
            lambda d: all(v["state"] not in ("pending", "loading") for v in d.execute_script(js)))
        return self.driver.execute_script(js)

    def sections(self) -> list[str]:
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll('section[data-section]')).map(s => s.dataset.section)")

    def images(self) -> list[dict]:
        """Every <img>: its src and whether it loaded (complete with a non-zero natural size)."""
        from selenium.webdriver.support.ui import WebDriverWait
        js = ("return Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete,"
              " width: i.naturalWidth}))")
        WebDriverWait(self.driver, 30, poll_frequency=0.25).until(
            lambda d: all(i["complete"] for i in d.execute_script(js)))
        return self.driver.execute_script(js)

    def js_errors(self) -> list[str]:
        return [e["message"] for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def requests(self) -> list[str]:
        """Every URL the page asked for since it was opened."""
        import json
        urls = []
        for entry in self.driver.get_log("performance"):
            msg = json.loads(entry["message"])["message"]
            if msg.get("method") == "Network.requestWillBeSent":
                urls.append(msg["params"]["request"]["url"])
            elif msg.get("method") == "Network.webSocketCreated":
                urls.append(msg["params"]["url"])
        return urls

    def screenshot(self, path: Path, full_page: bool = True) -> Path:
        """A PNG of the whole page (or of the window)."""
        d = self.driver
        if full_page:
            metrics = d.execute_cdp_cmd("Page.getLayoutMetrics", {})
            size = metrics.get("cssContentSize") or metrics["contentSize"]
            shot = d.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
            Path(path).write_bytes(base64.b64decode(shot["data"]))
        else:
            d.save_screenshot(str(path))
        return Path(path)


def network_requests(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(LOCAL_SCHEMES)]
