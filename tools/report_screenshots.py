"""Screenshots of the demo's reports for the README (docs/report-*.png).

    make demo && python tools/report_screenshots.py demo/derivatives docs

Opens demo/derivatives/sub-01.html and group/report.html in headless Chromium (tests/browser.py),
and keeps the page header plus a few sections of each, scaled to 50% and reduced to 128 colours.
"""
import argparse
import base64
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import browser  # noqa: E402

PAGES = {"participant": ("sub-01.html", ["summary", "tractography"]),
         "group": ("group/report.html", ["registration", "bundles"])}


def section_png(b: browser.Browser, section: str, max_height: int = 1500):
    from PIL import Image
    d = b.driver
    r = d.execute_script(f"const r = document.getElementById('{section}').getBoundingClientRect();"
                         "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]")
    x, y, w, h = r
    shot = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": x, "y": y, "width": w, "height": min(h, max_height), "scale": 1}})
    return Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("output_dir", type=Path)
    p.add_argument("dest", type=Path)
    args = p.parse_args()
    from PIL import Image
    args.dest.mkdir(parents=True, exist_ok=True)
    with browser.Browser() as b:
        for name, (page, sections) in PAGES.items():
            b.open(args.output_dir / page)
            b.wait_viewers()
            parts = [section_png(b, s) for s in sections]
            width = max(p.width for p in parts)
            img = Image.new("RGB", (width, sum(p.height for p in parts) + 8 * (len(parts) - 1)), "white")
            y = 0
            for part in parts:
                img.paste(part, (0, y))
                y += part.height + 8
            img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS).quantize(128)
            out = args.dest / f"report-{name}.png"
            img.save(out, optimize=True)
            print(f"{out}: {img.width}x{img.height}, {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
