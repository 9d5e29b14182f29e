"""HTML from Jinja2 templates (autoescaped); the page's CSS and viewer code are inlined so each report
is one file plus the figures it links."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..derivatives import atomic_write

TEMPLATES = Path(__file__).parent / "templates"


@lru_cache(maxsize=1)
def environment():
    import jinja2
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             trim_blocks=True, lstrip_blocks=True)   # a missing key: empty, falsy
    env.filters["num"] = _num
    env.filters["tojson_attr"] = lambda v: json.dumps(v)
    env.globals["asset"] = lambda name: (TEMPLATES / name).read_text()
    return env


def _num(v, digits: int = 3) -> str:
    if v is None or v == "":
        return "n/a"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if f != f:
        return "n/a"
    if f.is_integer() and abs(f) < 1e15:
        return f"{int(f):,}"
    return f"{f:.{digits}g}"


def relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` (a link in a page in ``start``), with forward slashes."""
    return Path(os.path.relpath(path, start)).as_posix()


def render_to(path: Path, template: str, context: dict) -> Path:
    html = environment().get_template(template).render(**context)
    with atomic_write(path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return Path(path)
