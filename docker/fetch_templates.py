"""Fetch the TemplateFlow files the app uses (docker/install.sh runs this with the installed Python).

    python docker/fetch_templates.py --tries 3

MNI152NLin2009cAsym at 1 and 2 mm: T1w, brain mask and WM probability map, into $TEMPLATEFLOW_HOME.
They come from TemplateFlow's servers: each failed attempt is retried after a pause (templateflow
downloads again the empty files an interrupted attempt leaves). When every attempt fails, one line
says why and how to build without them, and the exit status is 3.
"""
from __future__ import annotations

import argparse
import sys
import time

TEMPLATE = "MNI152NLin2009cAsym"
WANTED = [dict(suffix="T1w", desc=None), dict(suffix="mask", desc="brain"), dict(suffix="probseg", label="WM")]
RESOLUTIONS = (1, 2)
HINT = ("without a route to TemplateFlow's servers, build without them: docker build --build-arg "
        "TEMPLATEFLOW=skip (install.sh --templates skip); only --tbss-target/--tbss-space TEMPLATE need them")


def fetch() -> list:
    import templateflow.api as tf

    paths = []
    for res in RESOLUTIONS:
        for query in WANTED:
            path = tf.get(TEMPLATE, resolution=res, extension=".nii.gz", **query)
            if not path or isinstance(path, list) or path.stat().st_size < 1000:
                raise RuntimeError(f"TemplateFlow returned {path!r} for res-{res} {query}")
            paths.append(path)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=3, help="attempts (default: 3)")
    ap.add_argument("--wait", type=float, default=10.0, help="seconds before the 2nd attempt, doubling (default: 10)")
    args = ap.parse_args(argv)
    for attempt in range(1, args.tries + 1):
        try:
            for path in fetch():
                print(f"  {path}")
            return 0
        except Exception as exc:  # requests' ConnectionError, an HTTP status, a truncated file...
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())
            reason = reason if len(reason) <= 240 else reason[:237] + "..."
            if attempt == args.tries:
                print(f"install.sh: error: cannot fetch TemplateFlow's {TEMPLATE} ({args.tries} attempts; last: "
                      f"{reason}); {HINT}", file=sys.stderr)
                return 3
            wait = args.wait * 2 ** (attempt - 1)
            print(f"  TemplateFlow attempt {attempt}/{args.tries} failed ({reason}); retrying in {wait:g} s",
                  flush=True)
            time.sleep(wait)
    return 3


if __name__ == "__main__":
    sys.exit(main())
