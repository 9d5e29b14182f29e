"""Every option of tractoscale, declared once: its type, default, help text and check.

The settings form one frozen :class:`Config` of option groups (:class:`Selection`,
:class:`Resources`, :class:`Models`, :class:`Tracking`, :class:`Tbss`, :class:`Segmentation`,
:class:`Execution`).  Each field of a group is declared with :func:`option`: the command-line
parser (:func:`build_parser`) is generated from these declarations, and the README's options tables
and ``boutiques.json`` are generated from that parser (``tools/``).  A group checks its values
when it is created, so a Config that exists is valid; what needs the machine or the file system
(a GPU, an atlas file, a template) is checked by :mod:`bids_app.preflight` before any work starts.

Workflows and executor tasks receive these dataclasses (they pickle), never argparse namespaces.
Adding an option: add a field with :func:`option` to its group (and a check if its values are
restricted), then regenerate the README tables and the descriptor
(``python tools/make_readme_options.py && python tools/make_boutiques.py``).
Tracking fields that are kernel parameters take their default from, and are checked by,
:class:`kernels.params.TrackParams`: the same name from the command line to the kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar

from kernels.errors import ParameterError
from kernels.params import ALGORITHMS, TrackParams

from .errors import UsageError

LEVELS = ("participant", "group")
ODF_MODELS = ("csa", "opdt", "csd")
GRADIENT_CHECKS = ("auto", "warn", "off")
DEVICES = ("auto", "cpu", "cuda")
LEARNED = "learned"                           # a network from `tractoscale train-tracker`
TRACKING_METHODS = ALGORITHMS + (LEARNED, "none")
LEARNED_DIRECTIONS = ("max", "sample")
STOP_RULES = ("auto", "fod", "fa", "gfa", "mask", "act", "cmc")
SEEDINGS = ("wm", "interface", "brain")
TRACTOGRAM_FORMATS = ("trx", "tck", "trk")   # in order of preference (BEP046 *_tractogram.<ext>)
SEG_METHODS = ("ot", "centroid")
SEG_TRANSFORMS = ("auto", "tbss", "affine", "none")
SEG_TRACKS = ("prob", "ptt", "det", "boot", LEARNED)   # the tractogram segmented by default: first present
OT_REACH, OT_REACH_DEMO = 20.0, 5.0           # mm; the demo phantom is about half brain size

_DEFAULT_TRACK = TrackParams()


# --------------------------------------------------------------------------- declaring options

@dataclass(frozen=True)
class OptionSpec:
    """How one field appears on the command line, and what values it accepts."""

    help: str
    flags: tuple = ()                   # default: --field-name
    metavar: str | None = None
    choices: tuple | None = None
    type: Callable | None = None        # argparse conversion (int, float, Path, str)
    nargs: str | None = None
    action: str | None = None           # "store_true" or "count"
    exclusive: str | None = None        # fields sharing this key are mutually exclusive
    check: Callable[[Any], str | None] | None = None   # returns what is wrong, or None
    short: str | None = None            # e.g. "-w"


def option(default, help: str, **spec) -> Any:
    """A dataclass field that is also a command-line option (see :class:`OptionSpec`)."""
    return field(default=default, metadata={"option": OptionSpec(help=help, **spec)})


def spec_of(f: dataclasses.Field) -> OptionSpec:
    return f.metadata["option"]


def flags_of(f: dataclasses.Field) -> list[str]:
    s = spec_of(f)
    longs = list(s.flags) or ["--" + f.name.replace("_", "-")]
    return ([s.short] if s.short else []) + longs


# value checks: each returns a problem (completed by the flag) or None
def gpu_list(v):
    from kernels.device import parse_gpus
    try:
        parse_gpus(v)
    except ParameterError as exc:
        return exc.problem
    return None


def at_least(n):
    return lambda v: None if v is None or v >= n else f"must be >= {n} (got {v})"


def positive(v):
    return None if v is None or (v > 0 and math.isfinite(v)) else f"must be > 0 (got {v})"


def fraction(v):
    return None if v is None or 0 <= v < 1 else f"must be in [0, 1) (got {v})"


def open_unit(v):
    return None if v is None or 0 < v < 1 else f"must be between 0 and 1 (got {v})"


def even_order(v):
    return None if v is None or (v >= 2 and v % 2 == 0) else f"must be an even number >= 2 (got {v})"


def existing_file(v):
    return None if v is None or Path(v).is_file() else f"{v}: no such file"


class OptionGroup:
    """Base of the option groups: runs every field's check, then the group's own ``validate``."""

    title: ClassVar[str] = ""
    description: ClassVar[str | None] = None

    def __post_init__(self):
        for f in fields(self):
            check = spec_of(f).check
            problem = check(getattr(self, f.name)) if check else None
            if problem:
                raise option_error(f.name, problem)
        self.validate()

    def validate(self) -> None:
        """Checks between fields of the group (override)."""

    def _set(self, name: str, value) -> None:
        """Normalise a field while the frozen instance is being built."""
        object.__setattr__(self, name, value)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace):
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


# --------------------------------------------------------------------------- the groups

@dataclass(frozen=True)
class Selection(OptionGroup):
    title: ClassVar[str] = "selection"

    participant_label: tuple | None = option(
        None, "subjects to process, with or without 'sub-' (default: all)",
        flags=("--participant-label", "--participant_label"), nargs="+", metavar="LABEL")
    session_label: tuple | None = option(
        None, "sessions to process, with or without 'ses-' (default: all)",
        flags=("--session-label", "--session_label"), nargs="+", metavar="LABEL")
    bids_filter_file: Path | None = option(
        None, 'JSON with pybids entities to select the DWI, e.g. {"dwi": {"acquisition": "hardi"}}',
        flags=("--bids-filter-file", "--bids_filter_file"), type=Path, metavar="FILE")
    input_derivatives: Path | None = option(
        None, "preprocessed DWI (e.g. QSIPrep output with desc-preproc_dwi), preferred over raw",
        type=Path, metavar="DIR")
    skip_bids_validation: bool = option(
        False, "do not run the BIDS validator on bids_dir",
        flags=("--skip-bids-validation", "--skip_bids_validation"), action="store_true")
    bids_database_dir: Path | None = option(
        None, "a pybids index of the whole dataset, built once (under a file lock) and shared by "
              "concurrent runs such as array tasks; default: a private one per run",
        flags=("--bids-database-dir", "--bids_database_dir"), type=Path, metavar="DIR")

    def validate(self):
        for name, prefix in (("participant_label", "sub-"), ("session_label", "ses-")):
            value = getattr(self, name)
            if value is not None:
                self._set(name, tuple(dict.fromkeys(str(v).removeprefix(prefix) for v in value)))


@dataclass(frozen=True)
class Resources(OptionGroup):
    title: ClassVar[str] = "resources"

    work_dir: Path | None = option(
        None, "scratch folder (default: a temporary folder, removed at the end)",
        short="-w", type=Path, metavar="DIR")
    nthreads: int | None = option(
        None, "CPU threads for tracking and model fits, and workers of the group level's local pool "
              "(default: all available)",
        flags=("--nthreads", "--n_cpus"), type=int, metavar="N", check=at_least(1))
    omp_nthreads: int | None = option(
        None, "threads per process for BLAS/OpenMP (default: --nthreads)", type=int, metavar="N",
        check=at_least(1))
    mem: float | None = option(
        None, "memory limit in GB: sizes the tracking chunks and decides whether the ODF is "
              "pre-sampled on the sphere (default: the job's limit (cgroup, SLURM) or the free RAM)",
        type=float, metavar="GB", check=positive)
    device: str = option(
        "auto", "tractography/OT kernels: CUDA if a GPU is present (auto), or force one",
        choices=DEVICES)
    gpus: str = option(
        "all", "GPUs that tracking spreads its chunks over: all visible ones, or numbers such as "
               "0,2 (the tractogram does not depend on it)",
        metavar="all|N[,N...]", check=gpu_list)
    dask_scheduler: str | None = option(
        None, "run group-level tasks on a Dask cluster: scheduler address (tcp://host:port) or "
              "scheduler file; default: a local process pool of --nthreads workers",
        metavar="ADDRESS|FILE")

    @property
    def memory_bytes(self) -> int | None:
        return None if self.mem is None else int(self.mem * (1 << 30))


@dataclass(frozen=True)
class Models(OptionGroup):
    title: ClassVar[str] = "models"

    odf_model: str = option("csd", "ODF model fitted after DTI", choices=ODF_MODELS)
    sh_order: int | None = option(
        None, "maximum spherical-harmonic order (even; default: 8, lowered to fit the number of "
              "gradient directions)", type=int, metavar="L", check=even_order)
    gradient_check: str = option(
        "auto", "check the b-vectors for axis flips and permutations (as MRtrix3 dwigradcheck: the table "
                "giving the longest streamlines wins): auto applies a clearly better table, warn only "
                "reports it, off skips the check; the scores are in the DTI sidecars and the QC figure",
        choices=GRADIENT_CHECKS)
    angular_sr: Path | None = option(
        None, "angular super-resolution before the ODF fit: a PCCNN model file (published dmri-pcconv "
              "weights, a Lightning checkpoint, or one from 'tractoscale train-angular-sr'); the ODF is fitted "
              "on the acquired volumes plus the predicted ones (see README 'Angular super-resolution')",
        type=Path, metavar="MODEL", check=existing_file)
    angular_sr_directions: int | None = option(
        None, "--angular-sr: new directions predicted on each acquired shell (default: 60)", type=int,
        metavar="N", check=at_least(1), exclusive="angular_sr_targets")
    angular_sr_gradients: Path | None = option(
        None, "--angular-sr: predict the volumes of this .bvec file instead (FSL convention of the input "
              "DWI, its .bval beside it; b=0 rows are skipped, b-values must be acquired shells)", type=Path,
        metavar="BVEC", check=existing_file, exclusive="angular_sr_targets")

    def validate(self):
        for name in ("angular_sr_directions", "angular_sr_gradients"):
            if getattr(self, name) is not None and self.angular_sr is None:
                raise option_error(name, "needs --angular-sr MODEL")
        if self.angular_sr_gradients is not None:
            bval = self.target_bval
            if not bval.is_file():
                raise option_error("angular_sr_gradients", f"{bval.name} (its b-values, expected beside it) "
                                                           "does not exist")

    @property
    def target_bval(self) -> Path:
        """The .bval beside ``--angular-sr-gradients``."""
        g = Path(self.angular_sr_gradients)
        return g.with_name(g.name.removesuffix(".bvec") + ".bval")

    @property
    def sr_directions(self) -> int:
        return 60 if self.angular_sr_directions is None else self.angular_sr_directions


# Tracking fields named like TrackParams fields are kernel parameters: TrackParams gives their
# default and checks them (ParameterError -> UsageError naming the flag).
_KERNEL_FIELDS = ("algorithm", "step_size", "max_angle", "min_length", "max_length", "pmf_threshold",
                  "max_cross", "rng_seed")


@dataclass(frozen=True)
class Tracking(OptionGroup):
    title: ClassVar[str] = "tractography"

    algorithm: str = option(
        _DEFAULT_TRACK.algorithm, "tracking algorithm (learned: a network trained with 'tractoscale "
                                  "train-tracker', see --tracking-model), or none to skip tractography",
        flags=("--tracking",), choices=TRACKING_METHODS)
    n_seeds: int | None = option(
        None, "N seeds placed at random in the seed mask", type=int, metavar="N", exclusive="seeds",
        check=at_least(1))
    seeds_per_voxel: int | None = option(
        None, "K random seeds in every seed-mask voxel (default: 1)", type=int, metavar="K",
        exclusive="seeds", check=at_least(1))
    seed_mask: Path | None = option(
        None, "seed mask on the DWI grid (default: see --seeding)", type=Path, metavar="NIFTI",
        check=existing_file)
    seeding: str = option(
        "wm", "seed region when no --seed-mask: wm (FA > 0.25 in the brain mask), interface (WM voxels "
              "touching GM), brain (whole mask)", choices=SEEDINGS)
    step_size: float | None = option(
        None, "step size in mm (default: half the smallest voxel size; with --tracking learned, the model's "
              "own)", type=float, metavar="MM")
    max_angle: float = option(
        _DEFAULT_TRACK.max_angle, "maximum angle between steps in degrees", type=float,
        metavar="DEG")
    min_length: float = option(
        _DEFAULT_TRACK.min_length, "minimum streamline length in mm (shorter ones are discarded)", type=float,
        metavar="MM")
    max_length: float = option(
        _DEFAULT_TRACK.max_length, "maximum streamline length in mm", type=float, metavar="MM")
    stop_method: str = option(
        "auto", "stopping criterion: fod (FA above --stop-threshold and fibre-ODF peak amplitude above "
                "--fod-cutoff; CSD only), FA or GFA threshold, brain mask, or anatomical (ACT / CMC from "
                "WM/GM/CSF maps); auto: fod with --odf-model csd, fa with csa/opdt or --tracking learned",
        choices=STOP_RULES)
    stop_threshold: float = option(
        _DEFAULT_TRACK.stop_threshold, "FA (or GFA) threshold for --stop-method fod/fa/gfa", type=float,
        metavar="T")
    fod_cutoff: float = option(
        0.3, "--stop-method fod: tracking stops where the fibre ODF's peak amplitude falls below F x the "
             "median peak amplitude of the single-fibre voxels (FA > 0.7): tckgen's -cutoff, independent "
             "of the ODF's scale", type=float, metavar="F", check=open_unit)
    pmf_threshold: float = option(
        _DEFAULT_TRACK.pmf_threshold, "ODF values below F x the maximum are ignored",
        type=float, metavar="F")
    max_cross: int = option(
        _DEFAULT_TRACK.max_cross, "streamlines per seed: one per ODF peak, up to K", type=int,
        metavar="K")
    rng_seed: int = option(
        _DEFAULT_TRACK.rng_seed, "random seed; the same seed gives the same tractogram on any device", type=int, metavar="S")
    chunk_size: int | None = option(
        None, "seeds per chunk (default: from free memory)", type=int, metavar="N", check=at_least(1))
    tractogram_format: str = option(
        "trx", "tractogram file format", choices=TRACTOGRAM_FORMATS)
    float16: bool = option(False, "store TRX positions as float16 (half the size)", action="store_true")
    tracking_model: Path | None = option(
        None, "model file of --tracking learned (written by 'tractoscale train-tracker'); its step size "
              "is used", type=Path, metavar="FILE", check=existing_file)
    learned_direction: str = option(
        "max", "--tracking learned: follow the model's most probable direction (max) or draw one from its "
               "distribution (sample, with --rng-seed)", choices=LEARNED_DIRECTIONS)

    odf_mode: ClassVar[str] = "auto"
    sphere: ClassVar[str] = "repulsion724"

    def validate(self):
        try:
            step = _DEFAULT_TRACK.step_size if self.step_size is None else self.step_size
            self.kernel_params(step_size=step, algorithm=self.algorithm if self.uses_kernels else "prob")
        except ParameterError as exc:
            raise option_error(exc.name, exc.problem) from None
        if self.learned:
            if self.tracking_model is None:
                raise UsageError("--tracking learned needs --tracking-model FILE (a model from "
                                 "'tractoscale train-tracker')")
            if self.stop_method not in ("auto", "fa", "gfa", "mask"):
                raise option_error("stop_method", f"{self.stop_method} is not available with --tracking learned "
                                                  "(use auto, fa, gfa or mask)")
            if self.step_size is not None:
                raise option_error("step_size", "is set by the model with --tracking learned; leave it out")
            if self.max_cross != 1:
                raise option_error("max_cross", "applies to the ODF trackers; --tracking learned tracks one "
                                                "streamline per seed")
        elif self.tracking_model is not None:
            raise option_error("tracking_model", "needs --tracking learned")
        if self.stop_method in ("auto", "fod", "fa", "gfa") and not 0 <= self.stop_threshold < 1:
            raise option_error("stop_threshold", f"must be in [0, 1) for {self.stop_method} "
                                                 f"(got {self.stop_threshold})")
        if self.n_seeds is not None and self.seeds_per_voxel is not None:
            raise UsageError("give --n-seeds or --seeds-per-voxel, not both")
        if self.float16 and self.tractogram_format != "trx":
            raise option_error("float16", "applies only to --tractogram-format trx")

    @property
    def enabled(self) -> bool:
        return self.algorithm != "none"

    def stop_rule(self, odf_model: str) -> str:
        """``--stop-method`` with ``auto`` resolved for the ODF model."""
        if self.stop_method != "auto":
            return self.stop_method
        return "fod" if odf_model == "csd" and not self.learned else "fa"

    @property
    def learned(self) -> bool:
        return self.algorithm == LEARNED

    @property
    def uses_kernels(self) -> bool:
        """Tracking with the ODF kernels (prob, det, ptt, boot), not a learned model."""
        return self.enabled and not self.learned

    @property
    def extension(self) -> str:
        return "." + self.tractogram_format

    def kernel_params(self, **override) -> TrackParams:
        """The kernel's parameters (``step_size`` must be given when left to its default here)."""
        values = {k: getattr(self, k) for k in _KERNEL_FIELDS}
        values.update(override)
        return TrackParams(**values)

    def parameters(self) -> dict:
        """Settings that change the tractogram (JSON-able; not threads or chunk size)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "chunk_size"}
        if d["n_seeds"] is None and d["seeds_per_voxel"] is None:
            d["seeds_per_voxel"] = 1
        d["seed_mask"] = Path(self.seed_mask).name if self.seed_mask is not None else None   # content: a stage input
        if self.learned:    # the model file's content is a stage input; ODF settings play no part
            d["tracking_model"] = Path(self.tracking_model).name
            for name in ("pmf_threshold", "max_cross", "step_size"):
                d.pop(name)
            return d
        d.pop("tracking_model")
        d.pop("learned_direction")
        d.update(odf_mode=self.odf_mode, sphere=self.sphere)
        return d


@dataclass(frozen=True)
class Tbss(OptionGroup):
    title: ClassVar[str] = "TBSS"
    description: ClassVar[str] = "group level: TBSS-style skeleton statistics on FA/MD/AD/RD"

    tbss_target: str = option(
        "auto", "registration target: 'auto' (the most representative participant, from a coarse "
                "all-to-all registration), a TemplateFlow template name (its WM probability map is "
                "used; must be available offline) or a path to an FA image",
        metavar="auto|TEMPLATE|FILE")
    tbss_space: str | None = option(
        None, "align the target to this TemplateFlow template so outputs are in its space (named "
              "space-<TEMPLATE>); default: the target's own space (space-tbss)", metavar="TEMPLATE")
    skeleton_threshold: float = option(
        0.2, "mean-FA threshold of the skeleton", type=float, metavar="FA", check=fraction)
    stats_column: str | None = option(
        None, "participants.tsv column to test: numeric -> correlation, two levels -> two-sample t",
        metavar="COL")
    covariates: tuple | None = option(
        None, "participants.tsv columns to regress out", nargs="+", metavar="COL")
    n_permutations: int = option(
        5000, "permutations for the TFCE FWE correction", type=int, metavar="N",
        check=at_least(1))
    permutation_seed: int = option(
        0, "random seed of the permutations", type=int, metavar="SEED", check=at_least(0))
    tbss_quick: bool = option(
        False, "fewer registration iterations (previews and tests; less accurate)", action="store_true")

    def validate(self):
        if self.covariates and not self.stats_column:
            raise UsageError("--covariates needs --stats-column")
        if self.covariates is not None:
            self._set("covariates", tuple(self.covariates))


@dataclass(frozen=True)
class Segmentation(OptionGroup):
    title: ClassVar[str] = "bundle segmentation"
    description: ClassVar[str] = ("group level: label each participant's streamlines with an atlas "
                                  "(optimal transport), then tract profiles of FA/MD/AD/RD")

    atlas: Path | None = option(
        None, "bundle atlas: a TRX whose groups are the bundle labels, in the group's common space "
              "(default for the demo dataset: its own sourcedata/groundtruth/template atlas)",
        type=Path, metavar="TRX")
    atlas_space: str | None = option(
        None, "space of the atlas (default: NAME of a tpl-NAME_*.trx file name); when the TBSS common "
              "space differs, the mapped tractogram is refined by an affine fit onto the atlas",
        metavar="SPACE")
    atlas_max_fibres: int | None = option(
        None, "use at most N random fibres of each atlas bundle (faster on large atlases)", type=int,
        metavar="N", check=at_least(1))
    no_atlas_fragments: bool = option(
        False, "do not add fragments of the atlas fibres (by default 9 sub-fibres of 75%%, 50%% and 30%% "
               "of each fibre's length are added, so partial streamlines match; this makes the atlas "
               "10x larger)", action="store_true")
    seg_method: str = option(
        "ot", "label transfer: unbalanced optimal transport or the nearest-centroid baseline",
        choices=SEG_METHODS)
    seg_transform: str = option(
        "auto", "native -> atlas space: the TBSS transforms (tbss), a label-free affine fit of the "
                "tractogram onto the atlas (affine), both when needed (auto), or none",
        choices=SEG_TRANSFORMS)
    seg_track: str = option(
        "auto", "which participant tractogram to segment (default: the first present in the order "
                "prob, ptt, det, boot, learned)", choices=("auto",) + SEG_TRACKS)
    ot_blur: float = option(
        3.0, "smallest distance scale of the transport in mm (the final entropic blur)", type=float,
        metavar="MM", check=positive)
    ot_reach: float | None = option(
        None, "distance scale beyond which mass may be dropped (unbalanced transport): fibres farther "
              f"than about 1.5-2 x reach from every atlas fibre become outliers (default: {OT_REACH:g} mm; "
              f"{OT_REACH_DEMO:g} mm with the demo phantom's atlas, which is half brain size)", type=float, metavar="MM",
        check=positive)
    ot_scaling: float = option(
        0.9, "epsilon annealing: blur shrinks by this factor per iteration", type=float,
        metavar="S", check=open_unit)
    ot_outlier_level: float = option(
        0.2, "outlier class level: a fibre sending less than this fraction of its mass to every bundle "
             "is an outlier", type=float, metavar="F", check=fraction)
    ot_clusters: int | None = option(
        None, "K-means clusters of the multiscale solver (default: ~n/32, at most 1000)", type=int,
        metavar="K", check=at_least(1))
    n_profile_nodes: int = option(
        100, "nodes per tract profile", type=int, metavar="N", check=at_least(2))
    skip_segmentation: bool = option(
        False, "group level: run TBSS only, no bundle segmentation", action="store_true")

    @property
    def fragments(self) -> bool:
        return not self.no_atlas_fragments


@dataclass(frozen=True)
class Execution(OptionGroup):
    title: ClassVar[str] = "output"

    force: bool = option(False, "recompute outputs that already exist and are complete", action="store_true")
    verbose: int = option(0, "more logging (-v info, -vv debug)", short="-v", flags=("--verbose",),
                          action="count")
    no_progress: bool = option(False, "no progress bars", action="store_true")
    reports_only: bool = option(False, "only (re)write the HTML reports from the outputs already in output_dir: "
                                "nothing is fitted, tracked, registered or tested again", action="store_true")

    @property
    def progress(self) -> bool:
        return not self.no_progress


GROUPS = (Selection, Resources, Models, Execution, Tracking, Tbss, Segmentation)


@dataclass(frozen=True)
class Config:
    """One run of tractoscale: where, which level, and every option group."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    selection: Selection = field(default_factory=Selection)
    resources: Resources = field(default_factory=Resources)
    models: Models = field(default_factory=Models)
    tracking: Tracking = field(default_factory=Tracking)
    tbss: Tbss = field(default_factory=Tbss)
    segmentation: Segmentation = field(default_factory=Segmentation)
    execution: Execution = field(default_factory=Execution)

    def __post_init__(self):
        if self.analysis_level not in LEVELS:
            from .errors import UnknownLevelError
            raise UnknownLevelError(f"unknown analysis level '{self.analysis_level}': choose one of "
                                    f"{', '.join(LEVELS)}")
        object.__setattr__(self, "bids_dir", Path(self.bids_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.analysis_level == "participant" and self.tracking.enabled:
            check_algorithm_model(self.tracking.algorithm, self.models.odf_model)
            if self.tracking.stop_method == "fod" and self.models.odf_model != "csd":
                raise UsageError("--stop-method fod needs a fibre ODF (--odf-model csd); CSA/OPDT ODFs "
                                 "have no fibre amplitude: use --stop-method fa or gfa")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "Config":
        groups = {_GROUP_ATTR[g]: g.from_namespace(ns) for g in GROUPS}
        return cls(bids_dir=ns.bids_dir, output_dir=ns.output_dir, analysis_level=ns.analysis_level,
                   **groups)

    @classmethod
    def from_argv(cls, argv) -> "Config":
        return cls.from_namespace(build_parser().parse_args(list(argv)))


_GROUP_ATTR = {Selection: "selection", Resources: "resources", Models: "models", Tracking: "tracking",
               Tbss: "tbss", Segmentation: "segmentation", Execution: "execution"}


def check_algorithm_model(algorithm: str, odf_model: str) -> None:
    if algorithm == "boot" and odf_model not in ("csa", "opdt"):
        raise UsageError("--tracking boot refits CSA or OPDT ODFs: use --odf-model csa or opdt")


# --------------------------------------------------------------------------- errors and flags

def flag_for(name: str) -> str | None:
    """The command-line flag of a field (or a kernel parameter of the same name)."""
    for g in GROUPS:
        for f in fields(g):
            if f.name == name:
                return [x for x in flags_of(f) if x.startswith("--")][0]
    return None


def with_flags(text: str) -> str:
    """Replace field names (``max_length``) in a message by their flags (``--max-length``)."""
    def sub(m):
        return flag_for(m.group(0)) or m.group(0)
    return re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)+\b", sub, text)


def option_error(name: str, problem: str) -> UsageError:
    flag = flag_for(name) or name
    return UsageError(f"{flag} {with_flags(problem)}")


@contextlib.contextmanager
def flag_errors(device: str | None = None):
    """Turn the library's neutral errors into usage errors (exit 64) that name the flags."""
    from kernels.errors import DeviceError
    try:
        yield
    except ParameterError as exc:
        raise option_error(exc.name, exc.problem) from None
    except DeviceError as exc:
        raise UsageError(f"--device {device or 'cuda'}: {exc}") from None


# --------------------------------------------------------------------------- the parser

class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so every usage error maps to exit 64."""

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def help_text(f: dataclasses.Field) -> str:
    """The field's help, with its default appended unless the help explains the default itself."""
    s = spec_of(f)
    if "default" in s.help or f.default is None or s.action:
        return s.help
    default = f.default.as_posix() if isinstance(f.default, Path) else f.default
    return f"{s.help} (default: {default:g})" if isinstance(default, float) else f"{s.help} (default: {default})"


def add_group_arguments(parser: argparse.ArgumentParser, group: type[OptionGroup]) -> None:
    """The options of one group, as an argparse argument group."""
    g = parser.add_argument_group(group.title, group.description)
    exclusive: dict[str, Any] = {}
    for f in fields(group):
        s = spec_of(f)
        target = g
        if s.exclusive:
            if s.exclusive not in exclusive:
                exclusive[s.exclusive] = g.add_mutually_exclusive_group()
            target = exclusive[s.exclusive]
        kw: dict[str, Any] = {"dest": f.name, "help": help_text(f), "default": f.default}
        if s.action:
            kw["action"] = s.action
        else:
            for key in ("type", "nargs", "metavar", "choices"):
                if getattr(s, key) is not None:
                    kw[key] = getattr(s, key)
        target.add_argument(*flags_of(f), **kw)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = Parser(
        prog="tractoscale",
        description="BIDS App for diffusion MRI: DTI and ODF model maps, GPU/CPU tractography, "
                    "TBSS-style group statistics and atlas-based bundle segmentation.",
        epilog="Also: 'tractoscale demo-data OUT' writes the built-in demo dataset "
               "('tractoscale demo-data --help'); 'tractoscale train-tracker MODEL ...' trains a learned "
               "tracker for --tracking learned ('tractoscale train-tracker --help'); 'tractoscale "
               "train-angular-sr MODEL ...' trains a model for --angular-sr ('tractoscale train-angular-sr --help').")
    p.add_argument("bids_dir", type=Path, help="root of the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where derivatives are written (created if missing)")
    p.add_argument("analysis_level", help="'participant' (one subject at a time; parallel runs are safe) "
                                          "or 'group' (reads the participant outputs)")
    p.add_argument("--version", action="version", version=f"tractoscale {__version__}")
    for group in GROUPS:
        add_group_arguments(p, group)
    return p


def _check_unique_names():
    seen = {}
    for g in GROUPS:
        for f in fields(g):
            if f.name in seen:
                raise RuntimeError(f"option {f.name} is declared in {seen[f.name]} and {g.__name__}")
            seen[f.name] = g.__name__


_check_unique_names()

__all__ = ["Config", "Selection", "Resources", "Models", "Tracking", "Tbss", "Segmentation", "Execution",
           "GROUPS", "LEVELS", "build_parser", "add_group_arguments", "option", "flag_for", "option_error"]
