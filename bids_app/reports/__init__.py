"""HTML reports: one per participant run (``output_dir/sub-X[_ses-Y].html``) and one for the group
(``output_dir/group/report.html``), written from what the stages wrote, never recomputing science.
Figures are PNG files beside them; the 3D views use niivue (see :mod:`.viewer`)."""
from .participant import report_paths, write_participant_report

__all__ = ["report_paths", "write_participant_report"]
