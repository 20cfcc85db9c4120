"""``python -m mulclip_fast.study``: does MulCLIP pay where the paper uses it? (docs/study.md)

Pretrains the tiny towers once on short captions (CLIP's setting), then fine-tunes every row of the paper's
ablation — global only; global + LC + WPR; global + SAP; full MulCLIP; MulCLIP with CLIM instead of WPR —
plus FineLIP and SAP over all pairs, each for several seeds at equal steps, and writes a table with the
spread across seeds. ``plan`` holds the rows and settings, ``runner`` runs and resumes, ``report`` writes
the results, ``gradients`` measures how each fine-grained term's gradient meets the global one.
"""

from .plan import FULL, QUICK, ROWS, Row, StudySettings
from .runner import StudyError, run_study

__all__ = ["FULL", "QUICK", "ROWS", "Row", "StudyError", "StudySettings", "run_study"]
