"""Run the official BIDS validator (PyPI ``bids-validator-deno``) on the input dataset."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

from .errors import ValidationError

log = logging.getLogger(__name__)
VALIDATOR = "bids-validator-deno"


def validator_command() -> str | None:
    exe = shutil.which(VALIDATOR)
    if exe is None:  # installed in the same environment as us but not on PATH (e.g. venv not activated)
        import sys
        cand = Path(sys.executable).with_name(VALIDATOR)
        exe = str(cand) if cand.exists() else None
    return exe


def run_validator(bids_dir: Path, timeout: float = 1800) -> list[dict]:
    """Issues reported by the validator (each a dict with code, severity, location)."""
    exe = validator_command()
    if exe is None:
        raise FileNotFoundError(VALIDATOR)
    proc = subprocess.run([exe, "--format", "json", "--ignoreWarnings", str(bids_dir)],
                          capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ValidationError(f"the BIDS validator failed to run on {bids_dir}: "
                              f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}") from None
    issues = report.get("issues", {})
    if isinstance(issues, dict):
        issues = issues.get("issues", [])
    return issues


def validate(bids_dir: Path) -> None:
    """Raise :class:`ValidationError` (exit 16) when the dataset has validation errors."""
    try:
        issues = run_validator(bids_dir)
    except FileNotFoundError:
        log.warning("%s is not installed: skipping BIDS validation", VALIDATOR)
        return
    except subprocess.TimeoutExpired:
        log.warning("BIDS validation timed out; continuing without it")
        return
    errors = [i for i in issues if str(i.get("severity", "")).lower() == "error"]
    if errors:
        first = errors[0]
        where = first.get("location") or ""
        codes = sorted({e.get("code", "?") for e in errors})
        raise ValidationError(
            f"{bids_dir} is not valid BIDS: {len(errors)} error(s) ({', '.join(codes[:5])}), e.g. "
            f"{first.get('code')} at {where}; fix them or pass --skip-bids-validation")
    log.info("BIDS validation passed")
