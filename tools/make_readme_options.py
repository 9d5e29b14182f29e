"""Rewrite the README's options tables from the argparse parser.

Run after changing CLI options: ``python tools/make_readme_options.py``
(``--check`` exits 1 when the README is out of date).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
START, END = "<!-- options:start -->", "<!-- options:end -->"


def render() -> str:
    from bids_app.cli import build_parser
    parser = build_parser()
    out = ["Options (`tractoscale --help` prints the same; underscore spellings such as "
           "`--participant_label` are accepted too):"]
    for group in parser._action_groups:
        acts = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not acts:
            continue
        out += ["", f"**{group.title}**", "", "| option | meaning |", "|---|---|"]
        for a in acts:
            flags = ", ".join(f"`{o}`" for o in a.option_strings if not (o.startswith("--") and "_" in o))
            meta = ""
            if a.choices:
                meta = " " + "\\|".join(map(str, a.choices))
            elif a.metavar:
                meta = " " + str(a.metavar).replace("|", "\\|")
            # the help as argparse prints it: %(default)s filled in, %% unescaped; | escaped for the table
            text = (a.help or "").replace("%(default)s", str(a.default)).replace("%%", "%").replace("|", "\\|")
            out.append(f"| {flags}{meta} | {text} |")
    return "\n".join(out)


def main(argv=None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{render()}\n{END}{tail}"
    if check:
        return 0 if new == text else 1
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
