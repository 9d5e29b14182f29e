#!/usr/bin/env python3
"""Write ``boutiques.json`` (the Boutiques descriptor) from the argparse parser of ``tractoscale``.

    python tools/make_boutiques.py           # regenerate boutiques.json (commit the result)
    python tools/make_boutiques.py --check   # exit 1 if boutiques.json is out of date

Every option of :func:`bids_app.cli.build_parser` becomes one input (``--help`` and ``--version``
excepted, and options whose help is suppressed). Each input has its own value key.

The command line has the BIDS App layout ``bosh validate --bids`` looks for (``mkdir -p
[OUTPUT_DIR]; tractoscale [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] [PARTICIPANT_LABEL]
[SESSION_LABEL] ...``, the output folder as the one output file), with one deliberate difference:
the output folder is a single ``File`` input, where ``--bids`` asks for two inputs sharing the
``[OUTPUT_DIR]`` key, a File and a String. ``bosh exec launch`` mounts only File inputs into the
container (a String output folder is never mounted: the run cannot write its outputs), and it
substitutes every input of a shared key, the absent one erasing the key from the command line.
bosh mounts a File input only if it exists: create the output folder before launching.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "boutiques.json"
IMAGE = "tractoscale/tractoscale"

# Path-valued options naming folders the app creates: Boutiques "File" inputs must exist
# (bosh mounts them into the container), so these are "String".
CREATED_PATHS = {"work_dir", "bids_database_dir"}
# What one participant of typical size (1.25-2 mm, ~100 directions) asks for.
SUGGESTED_RESOURCES = {"cpu-cores": 8, "ram": 32, "disk-space": 20, "nodes": 1, "walltime-estimate": 7200}
SKIPPED_ACTIONS = (argparse._HelpAction, argparse._VersionAction)
FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                argparse._CountAction, argparse._AppendConstAction)


def project_version() -> str:
    """``version`` from pyproject.toml (works without the package being installed)."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def described_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's actions the descriptor describes, in parser order."""
    return [a for a in parser._actions
            if not isinstance(a, SKIPPED_ACTIONS) and a.help != argparse.SUPPRESS]


def primary_flag(action: argparse.Action) -> str:
    """The first long option string (``--work-dir`` rather than ``-w``)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return (longs or action.option_strings)[0]


def input_id(action: argparse.Action) -> str:
    """``--tracking`` -> ``tracking``: ids and value keys follow the flags users type."""
    return primary_flag(action).lstrip("-").replace("-", "_") if action.option_strings else action.dest


def value_key(action: argparse.Action) -> str:
    return f"[{input_id(action).upper()}]"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    if "%" in text:
        try:
            text = text % {**vars(action), "prog": parser.prog}
        except (KeyError, TypeError, ValueError):
            pass
    return text


def _name(action: argparse.Action) -> str:
    return input_id(action).replace("_", " ").capitalize()


def _json_value(value):
    return str(value) if isinstance(value, Path) else value


def _type(action: argparse.Action) -> dict:
    if isinstance(action, FLAG_ACTIONS):
        return {"type": "Flag"}  # a count action (-v) becomes a flag given once: no repeats in Boutiques
    choices = list(action.choices) if action.choices is not None else []
    if action.type is int or (choices and all(isinstance(c, int) for c in choices)):
        return {"type": "Number", "integer": True}
    if action.type is float:
        return {"type": "Number"}
    if action.type is Path and input_id(action) not in CREATED_PATHS:
        return {"type": "File"}
    return {"type": "String"}


def _input(parser: argparse.ArgumentParser, action: argparse.Action) -> dict:
    """One Boutiques input for one optional argparse action."""
    entry = {"id": input_id(action), "name": _name(action), **_type(action),
             "description": _help(parser, action), "value-key": value_key(action),
             "command-line-flag": primary_flag(action), "optional": True}
    if entry["type"] == "Flag":
        return entry
    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if many or isinstance(action, argparse._AppendAction):
        entry["list"] = True
        if action.nargs == "+":
            entry["min-list-entries"] = 1
        elif isinstance(action.nargs, int):
            entry["min-list-entries"] = entry["max-list-entries"] = action.nargs
    if action.choices is not None:
        entry["value-choices"] = [_json_value(c) for c in action.choices]
    if action.default is not None and action.default != argparse.SUPPRESS:
        entry["default-value"] = _json_value(action.default)
    return entry


def _positional(parser, action: argparse.Action, levels) -> list[dict]:
    desc = _help(parser, action)
    if action.dest == "bids_dir":
        return [{"id": "bids_dir", "name": "BIDS dataset", "type": "File", "description": desc,
                 "value-key": "[BIDS_DIR]", "optional": False}]
    if action.dest == "output_dir":
        # a File, so that bosh mounts it (see the module's docstring)
        return [{"id": "output_dir", "name": "Output directory", "type": "File",
                 "description": f"{desc}; create it before bosh exec launch, which mounts only "
                                "paths that exist",
                 "value-key": "[OUTPUT_DIR]", "optional": False}]
    if action.dest == "analysis_level":
        return [{"id": "analysis_level", "name": "Analysis level", "type": "String", "description": desc,
                 "value-key": "[ANALYSIS_LEVEL]", "value-choices": list(levels), "optional": False}]
    raise ValueError(f"positional argument '{action.dest}' has no Boutiques mapping: add one here")


def build_descriptor(parser: argparse.ArgumentParser | None = None, version: str | None = None) -> dict:
    """The descriptor as a dict."""
    if parser is None:
        from bids_app.cli import build_parser
        parser = build_parser()
    from bids_app.cli import LEVELS
    version = version or project_version()
    actions = described_actions(parser)
    positionals = [a for a in actions if not a.option_strings]
    optionals = [a for a in actions if a.option_strings]
    order = {"participant_label": 0, "session_label": 1}  # right after the positionals (bosh --bids)
    optionals.sort(key=lambda a: order.get(input_id(a), 2))  # stable: parser order otherwise

    inputs = [inp for a in positionals for inp in _positional(parser, a, LEVELS)]
    inputs += [_input(parser, a) for a in optionals]
    keys = ["[BIDS_DIR]", "[OUTPUT_DIR]", "[ANALYSIS_LEVEL]"] + [value_key(a) for a in optionals]
    shared = sorted({k for k in keys if keys.count(k) > 1})
    if shared or len(keys) != len(inputs):
        raise ValueError(f"value keys must be one per input (bosh substitutes every input of a key): {shared}")
    groups = []
    for i, group in enumerate(parser._mutually_exclusive_groups):
        members = [input_id(a) for a in group._group_actions if a in optionals]
        if len(members) > 1:
            groups.append({"id": f"exclusive_{i}", "name": f"One of {', '.join(members)}",
                           "members": members, "mutually-exclusive": True,
                           "one-is-required": bool(group.required)})
            for inp in inputs:  # a default would always select one member
                if inp["id"] in members:
                    inp.pop("default-value", None)
    return {
        "name": "tractoscale",
        "tool-version": version,
        "description": parser.description,
        "url": "https://github.com/tractoscale/tractoscale",
        "schema-version": "0.5",
        "command-line": "mkdir -p [OUTPUT_DIR]; tractoscale " + " ".join(keys),
        "container-image": {"type": "docker", "image": f"{IMAGE}:{version}", "index": "docker.io"},
        "inputs": inputs,
        "groups": groups,
        "output-files": [{"id": "derivatives", "name": "Derivatives",
                          "description": "the output folder (BIDS derivatives)",
                          "path-template": "[OUTPUT_DIR]", "optional": False}],
        "suggested-resources": SUGGESTED_RESOURCES,
        "tags": {"domain": ["neuroimaging", "diffusion MRI", "tractography"], "bids-app": True},
    }


def render(descriptor: dict) -> str:
    return json.dumps(descriptor, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare with the committed file")
    ap.add_argument("-o", "--output", type=Path, default=DESCRIPTOR, help="default: boutiques.json")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    text = render(build_descriptor())
    if args.check:
        old = args.output.read_text() if args.output.exists() else ""
        if old == text:
            print(f"{args.output} is up to date")
            return 0
        sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                   str(args.output), "regenerated"))
        print(f"\n{args.output} is out of date: run python tools/make_boutiques.py", file=sys.stderr)
        return 1
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
