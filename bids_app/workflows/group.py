"""Group level: TBSS-style statistics on the FA maps, then atlas-based bundle
segmentation and tract profiles on the tractograms.  Reads only what the
participant level wrote into output_dir; work runs on one executor (a local
process pool, or Dask when --dask-scheduler is given)."""
from __future__ import annotations

import logging
from pathlib import Path

from ..derivatives import TRACTOGRAM_FORMATS
from ..errors import NoInputError
from .participant import prepare

log = logging.getLogger("tractoscale.group")


def _has_tractograms(output_dir: Path) -> bool:
    """Any participant tractogram, in any format the participant level writes."""
    return any(any(Path(output_dir).glob(f"sub-*/**/dwi/*_tractogram.{fmt}")) for fmt in TRACTOGRAM_FORMATS)


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


def run_group_level(args) -> int:
    from ..group import bundles, tbss
    from ..group.executor import make_executor

    prepare(args)
    if not any(Path(args.output_dir).glob("sub-*/**/*_model-tensor_param-fa_dwimap.nii.gz")):
        raise NoInputError(f"no participant outputs (FA maps) in {args.output_dir}: "
                           "run the participant level first")
    participants = [{"sub": s} for s in args.participant_label] if args.participant_label else None
    with make_executor(args.nthreads, getattr(args, "dask_scheduler", None)) as executor:
        result = tbss.run_tbss(bids_dir=args.bids_dir, output_dir=args.output_dir,
                               participants=participants, args=args, executor=executor)
        _summarise_tbss(result)
        if getattr(args, "skip_segmentation", False):
            pass
        elif _has_tractograms(args.output_dir):
            seg = bundles.run_segmentation(bids_dir=args.bids_dir, output_dir=args.output_dir,
                                           participants=participants, args=args, executor=executor)
            counts = seg.get("counts", {}) if isinstance(seg, dict) else {}
            log.info("segmentation: %d participant run(s); profiles in %s", len(counts),
                     seg.get("profiles") if isinstance(seg, dict) else "?")
        else:
            log.warning("no tractograms in %s: bundle segmentation skipped", args.output_dir)
    print(f"group level done; outputs in {Path(args.output_dir) / 'group'}")
    return 0
