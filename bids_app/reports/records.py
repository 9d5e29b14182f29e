"""What the stages left on disk, read back for the reports: completion records, JSON sidecars,
TSV tables and the warnings of the runs' log files.  Nothing here computes anything new."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd

from ..stages import RECORD_DIR

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ (WARNING|ERROR|CRITICAL) ([\w.]+): (.*)$")
LOG_NAME = re.compile(r"^(?P<label>.+)_(?P<time>\d{8}-\d{6})_(?P<pid>\d+)\.log$")
# sidecar fields that report a downgrade or a check; shown wherever a stage's sidecar has them
NOTE_KEYS = ("Warnings", "Downgrades", "Downgrade")
CHECK_KEYS = ("GradientCheck",)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_table(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype=str)
    except (OSError, ValueError):
        return None


def stage_records(record_dir: Path, prefix: str = "") -> dict:
    """``{stage name without prefix: record}`` of every completion record in ``record_dir``."""
    out = {}
    for p in sorted(Path(record_dir).glob("*.json")):
        rec = read_json(p)
        if rec and p.stem.startswith(prefix):
            out[p.stem[len(prefix):]] = rec
    return out


def record_of(path_in_stage_folder: Path, key: str) -> dict:
    return read_json(Path(path_in_stage_folder) / RECORD_DIR / f"{key}.json")


def _finished(rec: dict) -> float | None:
    try:
        return time.mktime(time.strptime(rec["finished"], "%Y-%m-%dT%H:%M:%S"))
    except (KeyError, TypeError, ValueError):
        return None


def run_logs(logs_dir: Path, label: str, records: list[dict] | None = None) -> list[Path]:
    """The log files of ``label`` that belong to the runs which wrote the current outputs: for each
    record, the latest log of the same process id started before the record was finished.  Without
    records: the latest log."""
    logs = []
    for p in Path(logs_dir).glob(f"{label}_*.log"):
        m = LOG_NAME.match(p.name)
        if m and m["label"] == label:
            started = time.mktime(time.strptime(m["time"], "%Y%m%d-%H%M%S"))
            logs.append((started, int(m["pid"]), p))
    logs.sort()
    if not logs:
        return []
    if not records:
        return [logs[-1][2]]
    chosen = []
    for rec in records:
        done = _finished(rec)
        cands = [p for started, pid, p in logs if pid == rec.get("pid") and (done is None or started <= done + 1)]
        if cands and cands[-1] not in chosen:
            chosen.append(cands[-1])
    return sorted(chosen, key=lambda p: p.name)


def log_warnings(paths: list[Path]) -> list[dict]:
    """WARNING/ERROR lines of log files: ``{time, level, logger, message, log}`` (continuation lines
    of a multi-line message are appended to it)."""
    out = []
    for path in paths:
        try:
            lines = Path(path).read_text(errors="replace").splitlines()
        except OSError:
            continue
        current = None
        for line in lines:
            m = LOG_LINE.match(line)
            if m:
                current = {"time": m[1], "level": m[2], "logger": m[3], "message": m[4], "log": Path(path).name}
                out.append(current)
            elif current is not None and line and not line[:4].isdigit():
                current["message"] += "\n" + line
            else:
                current = None
    return out


def sidecar_notes(sidecars: dict) -> tuple[list[dict], dict]:
    """Downgrade/warning fields and check results found in sidecars ``{file name: sidecar}``, each
    once however many sidecars repeat it: ``([{file, message}], {files: check result})``."""
    notes, checks = {}, {}
    for name, side in sidecars.items():
        for key in NOTE_KEYS:
            val = side.get(key) or (side.get("tractoscale") or {}).get(key)
            for item in (val if isinstance(val, list) else [val] if val else []):
                msg = item if isinstance(item, str) else json.dumps(item)
                notes.setdefault(msg, []).append(name)
        for key in CHECK_KEYS:
            val = side.get(key) or (side.get("tractoscale") or {}).get(key)
            if val:
                checks.setdefault(json.dumps(val, sort_keys=True), (val, []))[1].append(name)
    return ([{"file": _names(files), "message": msg} for msg, files in notes.items()],
            {_names(files): val for val, files in checks.values()})


def _names(files: list[str]) -> str:
    return files[0] if len(files) == 1 else f"{files[0]} (and {len(files) - 1} more sidecars)"


def flatten(d, prefix: str = "") -> list[tuple[str, str]]:
    """Nested parameters as ``[("A.B", "value"), ...]`` for a two-column table."""
    rows = []
    if isinstance(d, dict):
        for k, v in d.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            rows += flatten(v, f"{prefix}[{i}]")
    else:
        rows.append((prefix, _fmt(d)))
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return "n/a" if v is None else str(v)
