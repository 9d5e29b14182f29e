"""Checks at the edge: everything that can be known wrong before the first participant is touched.

:class:`~bids_app.config.Config` already guarantees value ranges and combinations; this adds what
needs the machine or the file system: the requested device, the TBSS target and template, the
statistics columns, the bundle atlas, the learned tracker's and the angular super-resolution model
files.  Each failure is a
:class:`UsageError` (exit 64) naming the flag, or an :class:`~bids_app.errors.InputDataError` (exit 65)
for a model file whose content is unusable, raised within a second or two and before anything is
written.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config, flag_errors
from .errors import TractoscaleError, UsageError


def preflight(config: Config) -> None:
    check_device(config)
    if config.analysis_level == "participant":
        check_tracking_model(config)
        check_angular_sr(config)
    if config.analysis_level == "group":
        check_tbss(config)
        check_segmentation(config)


def check_device(config: Config) -> None:
    """``--device cuda`` needs a usable GPU now, not after DTI and CSD."""
    if config.resources.device == "auto":
        return
    from kernels.device import select_device
    with flag_errors(config.resources.device):
        select_device(config.resources.device)


def check_tracking_model(config: Config) -> None:
    """``--tracking learned``: PyTorch installed, the model file a complete tractoscale tracker."""
    if not config.tracking.learned:
        return
    from .learned import check_model_file, require_learn_extra
    require_learn_extra()
    check_model_file(config.tracking.tracking_model)
    if config.resources.device == "cuda":        # PyTorch's view of the GPU (a CPU-only build sees none)
        from kernels.learned.api import torch_device
        with flag_errors("cuda"):
            torch_device("cuda")


def check_angular_sr(config: Config) -> None:
    """``--angular-sr MODEL``: PyTorch installed, the file a usable PCCNN checkpoint (exit 65 if not)."""
    if config.models.angular_sr is None:
        return
    from .angular_sr.app import check_model_file
    check_model_file(config.models.angular_sr, config.resources.device)


def _as_usage(exc: TractoscaleError) -> UsageError:
    return exc if isinstance(exc, UsageError) else UsageError(str(exc))


def check_tbss(config: Config) -> None:
    from .group.tbss.target import target_kind, templateflow_image
    tbss = config.tbss
    try:
        target_kind(tbss.tbss_target)
        if tbss.tbss_space:
            templateflow_image(tbss.tbss_space)
        if tbss.stats_column:
            from .group.tbss.stats import check_columns
            check_columns(config.bids_dir, tbss.stats_column, tbss.covariates)
    except TractoscaleError as exc:
        raise _as_usage(exc) from None


def check_segmentation(config: Config) -> None:
    """The atlas must exist and be a TRX with bundle groups when segmentation will run."""
    seg = config.segmentation
    if seg.skip_segmentation:
        return
    from .group.bundles.atlas import DEMO_ATLAS, atlas_problem
    from .workflows.group import has_tractograms
    if seg.atlas is not None:
        problem = atlas_problem(seg.atlas)
        if problem:
            raise UsageError(f"--atlas {seg.atlas}: {problem}")
        return
    if (Path(config.bids_dir) / DEMO_ATLAS).is_file() or not has_tractograms(config.output_dir):
        return
    raise UsageError("bundle segmentation needs an atlas: pass --atlas PATH (a TRX whose groups are bundle "
                     "labels, in the group's common space) or --skip-segmentation")
