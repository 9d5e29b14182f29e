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

import os

from .config import Config, flag_errors
from .errors import TractoscaleError, UsageError


def preflight(config: Config) -> None:
    check_device(config)
    check_memory(config)
    if config.analysis_level == "participant":
        check_tracking_model(config)
        check_angular_sr(config)
    if config.analysis_level == "group":
        check_tbss(config)
        check_segmentation(config)


def check_device(config: Config) -> None:
    """``--device cuda`` needs a usable GPU now, not after DTI and CSD; ``--gpus`` must name
    visible GPUs."""
    from kernels.device import check_gpus, select_device
    with flag_errors(config.resources.device):
        if config.resources.device != "auto":
            select_device(config.resources.device)
        if config.resources.device != "cpu":
            check_gpus(config.resources.gpus)


def check_memory(config: Config) -> None:
    """``--mem`` beyond the machine's RAM is a mistake (megabytes for gigabytes?): chunks sized for
    it would exhaust the node."""
    mem = config.resources.memory_bytes
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if mem is not None and total > 0 and mem > total:
        raise UsageError(f"--mem {config.resources.mem:g} GB is more than this machine's "
                         f"{total / (1 << 30):.0f} GB of memory (--mem is in GB)")


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
    """A given ``--atlas`` must exist and be a TRX with bundle groups (exit 64 before TBSS runs).
    Without one, the group level runs TBSS and skips the segmentation with a warning."""
    seg = config.segmentation
    if seg.skip_segmentation or seg.atlas is None:
        return
    from .group.bundles.atlas import atlas_problem
    problem = atlas_problem(seg.atlas)
    if problem:
        raise UsageError(f"--atlas {seg.atlas}: {problem}")
