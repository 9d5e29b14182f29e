"""Group level: TBSS-style statistics on the FA maps, then atlas-based bundle segmentation and tract
profiles on the tractograms.  Reads only what the participant level wrote into output_dir; work
runs on one executor (a local process pool, or Dask when --dask-scheduler is given)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import TRACTOGRAM_FORMATS, Config
from ..derivatives import remove_stale_temporaries
from ..errors import NoInputError
from .participant import _run_log, prepare

log = logging.getLogger("tractoscale.group")


def has_tractograms(output_dir: Path) -> bool:
    """Any participant tractogram, in any format the participant level writes."""
    return any(any(Path(output_dir).glob(f"sub-*/**/dwi/*_tractogram.{fmt}")) for fmt in TRACTOGRAM_FORMATS)


def segmentation_atlas_available(config: Config) -> bool:
    """``--atlas`` given, or the demo dataset's own atlas present."""
    from ..group.bundles.atlas import DEMO_ATLAS
    return config.segmentation.atlas is not None or (Path(config.bids_dir) / DEMO_ATLAS).is_file()


def _summarise_tbss(result):
    if not isinstance(result, dict):
        return
    log.info("TBSS: %s participants, target %s, FA correlation %.2f -> %.2f, %s skeleton voxels",
             result.get("n_participants"), (result.get("target") or {}).get("Label", "?"),
             result.get("mean_corr_before", float("nan")), result.get("mean_corr_after", float("nan")),
             result.get("skeleton_voxels"))
    for name, r in ((result.get("stats") or {}).get("results") or {}).items():
        log.info("TBSS %s: min FWE p %.3f, %d significant voxels", name, r.get("min_p_fwe", 1.0),
                 r.get("n_significant", 0))


def run_group_level(config: Config) -> int:
    prepare(config)
    out = config.output_dir
    for path in remove_stale_temporaries([out]):
        log.info("removed %s, left by a process that no longer runs", path)
    if not any(Path(out).glob("sub-*/**/*_model-tensor_param-fa_dwimap.nii.gz")):
        raise NoInputError(f"no participant outputs (FA maps) in {out}: run the participant level first")
    if config.execution.reports_only:
        return _report(config)
    with _run_log(out, "group"):
        _science(config)
        _report(config)
    print(f"group level done; outputs in {Path(out) / 'group'}")
    return 0


def _science(config: Config) -> None:
    from ..group import bundles, tbss
    from ..group.executor import make_executor

    out = config.output_dir
    labels = config.selection.participant_label
    participants = [{"sub": s} for s in labels] if labels else None
    sessions = config.selection.session_label
    progress = config.execution.progress
    with make_executor(config.resources.nthreads, config.resources.dask_scheduler) as executor:
        result = tbss.run_tbss(bids_dir=config.bids_dir, output_dir=out, participants=participants,
                               options=config.tbss, executor=executor, sessions=sessions, progress=progress)
        _summarise_tbss(result)
        if config.segmentation.skip_segmentation:
            pass
        elif not segmentation_atlas_available(config):
            log.warning("bundle segmentation skipped: no atlas (pass --atlas PATH, a TRX whose groups are "
                        "bundle labels in the group's common space; see the README's 'Bundle atlases'); "
                        "the TBSS results stand")
        elif has_tractograms(out):
            seg = bundles.run_segmentation(bids_dir=config.bids_dir, output_dir=out, participants=participants,
                                           options=config.segmentation, executor=executor,
                                           device=config.resources.device, sessions=sessions,
                                           force=config.execution.force, progress=progress)
            log.info("segmentation: %d participant run(s); profiles in %s", len(seg.get("counts", {})),
                     seg.get("profiles"))
        else:
            log.warning("no tractograms in %s: bundle segmentation skipped", out)


def _report(config: Config) -> int:
    """The group report (a stage: rewritten when its inputs changed or a file of it is missing)."""
    from ..reports.group import report_stage, write_group_report
    stage = report_stage(config.output_dir)
    if config.execution.force or config.execution.reports_only or not stage.is_complete():
        with stage.running():
            path = write_group_report(config.output_dir, config.bids_dir)
        print(f"group report: {path}")
    return 0
