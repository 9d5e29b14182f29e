"""``--angular-sr MODEL``: the participant stage that predicts new q-space directions before the ODF fit.

* :func:`check_model_file` (preflight, before any work): PyTorch installed, the file a usable PCCNN
  checkpoint (exit 65 otherwise), and with ``--device cuda`` a GPU PyTorch can use.
* :func:`check_run` (before a run's stages): the run's shells are among the model's (exit 65).
* :func:`write_angsr` (the ``angsr`` stage): writes ``*_desc-angsr_dwi.nii.gz`` = the acquired volumes,
  unchanged and first, then the predicted ones, with its ``.bval``/``.bvec`` and a sidecar naming the
  model (file, SHA-256, architecture, shells) and the q-space that was asked for.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputDataError

log = logging.getLogger(__name__)

WHAT = "--angular-sr"


@contextlib.contextmanager
def model_errors(prefix: str | None = None):
    from .modelfile import ModelFileError, ShellError
    try:
        yield
    except ModelFileError as exc:
        raise InputDataError(f"{WHAT} model {exc.path}: {exc.problem}") from None
    except ShellError as exc:
        raise InputDataError(f"{prefix or 'the data'}: {exc}") from None


def check_model_file(path, device: str = "auto"):
    """Preflight: the model loads (tensors only) and, for ``cuda``, PyTorch sees a GPU."""
    from ..config import flag_errors
    from ..learned import prepare_torch, require_learn_extra
    require_learn_extra(WHAT)
    prepare_torch(1)
    from .modelfile import load_model
    with model_errors():
        _, info = load_model(path, "cpu")
    if device == "cuda":
        from kernels.learned.api import torch_device
        with flag_errors("cuda"):
            torch_device("cuda")
    return info


def check_run(bval_path: Path, info, target_bval: Path | None = None) -> None:
    """Before a run's stages: every diffusion-weighted shell of the run is one of the model's, and every
    requested b-value (``--angular-sr-gradients``) one of the run's shells."""
    from .predict import check_targets, shell_groups
    try:
        bvals = np.loadtxt(bval_path, ndmin=1, dtype=float).ravel()
    except (OSError, ValueError):
        return    # reported with its file name when the DWI is loaded
    with model_errors(f"{Path(bval_path).name}: the data cannot feed the model {Path(info.path).name}"):
        groups = shell_groups(bvals, info.match_shells(bvals))
    if target_bval is not None:
        try:
            wanted = np.loadtxt(target_bval, ndmin=1, dtype=float).ravel()
        except (OSError, ValueError) as exc:
            raise InputDataError(f"--angular-sr-gradients: cannot read {Path(target_bval).name} ({exc})") from None
        with model_errors(f"{Path(bval_path).name}: --angular-sr-gradients {Path(target_bval).name}"):
            check_targets(groups, wanted[wanted > 50])


def read_targets(bval_path: Path, bvec_path: Path, affine):
    """``(bvals, unit voxel-frame bvecs)`` of the diffusion-weighted rows of a requested gradient table."""
    from ..gradients import fsl_to_voxel_bvecs, read_bvals_bvecs
    try:
        b, v = read_bvals_bvecs(bval_path, bvec_path)
    except (OSError, ValueError) as exc:
        raise InputDataError(f"--angular-sr-gradients {Path(bvec_path).name}: {exc}") from None
    keep = b > 50
    v = fsl_to_voxel_bvecs(v[keep], affine)
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    if not keep.any() or np.any(norm < 0.5):
        raise InputDataError(f"--angular-sr-gradients {Path(bvec_path).name}: no diffusion-weighted rows, or "
                             "zero vectors with b > 50")
    return b[keep], v / norm


def write_angsr(dwi, mask, inp, out_paths, *, model_path, n_new: int, targets=None, device: str = "auto",
                nthreads: int | None = None, progress: bool = False, sidecar: dict | None = None) -> dict:
    """Predict ``n_new`` directions per shell (or the volumes of the gradient files ``targets = (bval,
    bvec)``); write the combined DWI, its gradient files and sidecar."""
    from kernels.learned.api import torch_device

    from ..derivatives import atomic_write, save_nifti
    from ..gradients import fsl_to_voxel_bvecs, read_bvals_bvecs, voxel_to_fsl_bvecs, write_bvals_bvecs
    from ..inputs import B0_THRESHOLD
    from ..learned import prepare_torch
    from .modelfile import load_model
    from .predict import super_resolve

    prepare_torch(nthreads)
    dev = torch_device(device)
    t0 = time.perf_counter()
    # every voxel as acquired (the network sees the same surroundings as in training; the acquired
    # volumes are written back unchanged); ``dwi`` gives the gradient table the DTI stage chose
    acquired = np.asarray(nib.load(str(inp.dwi)).dataobj, dtype=np.float32)
    with model_errors(f"{inp.dwi.name}: the data cannot feed the model {Path(model_path).name}"):
        module, info = load_model(model_path, dev)
        wanted = None if targets is None else read_targets(*targets, dwi.affine)
        pred, new_b, new_v, details = super_resolve(module, info, acquired, dwi.bvals, dwi.bvecs, mask,
                                                    n_new=n_new, targets=wanted, device=dev, progress=progress)
    seconds = time.perf_counter() - t0
    nii, bval, bvec = out_paths
    acq_b, acq_v = read_bvals_bvecs(inp.bval, inp.bvec)            # acquired rows exactly as given...
    dw = acq_b > B0_THRESHOLD
    corrected = not np.allclose(fsl_to_voxel_bvecs(acq_v, dwi.affine)[dw], dwi.bvecs[dw], atol=1e-6)
    if corrected:          # ...unless the gradient check corrected them: the table the fits use
        acq_v = np.where(dw[:, None], voxel_to_fsl_bvecs(dwi.bvecs, dwi.affine), acq_v)
    bvals = np.concatenate([acq_b, new_b])
    bvecs = np.concatenate([acq_v, voxel_to_fsl_bvecs(new_v, dwi.affine)])
    n_acq = acquired.shape[3]
    side = dict(sidecar or {})
    side.update({
        "Description": "The acquired DWI volumes (unchanged, first) followed by volumes predicted at new "
                       "q-space directions by a spatio-angular parametric continuous convolution network "
                       "(PCCNN); the predicted volumes are zero outside the brain mask",
        "AcquiredVolumes": [0, n_acq - 1],
        "AcquiredGradientTable": "corrected by the gradient check (see the DTI sidecars)" if corrected else
                                 "as given",
        "PredictedVolumes": [n_acq, n_acq + len(new_b) - 1],
        "AngularSuperResolution": {
            "Model": info.describe(),
            "RequestedQSpace": ({"DirectionsPerShell": int(n_new),
                                 "Directions": "evenly spread (electrostatic repulsion, dipy disperse_charges), "
                                               "the same for every run"} if targets is None else
                                {"GradientFiles": [Path(t).name for t in targets]})
            | {"Shells": sorted({float(b) for b in new_b}), "Total": int(len(new_b))},
            "Device": dev, "Seconds": round(seconds, 2), **details}})
    with atomic_write(Path(bval)) as tmp_b, atomic_write(Path(bvec)) as tmp_v:
        write_bvals_bvecs(tmp_b, tmp_v, bvals, bvecs)
    save_nifti(np.concatenate([acquired, pred], axis=-1), dwi.affine, nii, sidecar=side)
    log.info("%s: angular SR with %s on %s: %d predicted volumes in %.1f s", inp.label,
             Path(model_path).name, dev, len(new_b), seconds)
    return {"seconds": seconds, "device": dev, "predicted": int(len(new_b))}
