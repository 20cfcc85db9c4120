"""What the study runs: the rows of the paper's ablation and the two settings, full and ``--quick``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One fine-tuning objective of the table: its key (run directory names, results.json), its label
    and the ``TrainConfig`` settings that make it."""

    key: str
    label: str
    settings: dict
    # Measure the gradient alignment of this row's fine-grained terms at the fine-tuning start (rows whose
    # terms differ in form, not only in weight or schedule; needs WPR and SAP on).
    gradients: bool = False


# The paper's ablation (MulCLIP, Table "ablation": global only; + LC + WPR; + SAP; full; CLIM instead of WPR),
# then FineLIP and SAP over all pairs. "LC" is the token calibration of both towers, which WPR and CLIM read;
# SAP alone reads raw patches, as the paper's "+ SAP" row has no LC.
ROWS = (
    Row("global", "global only", {"loss": "global"}),
    Row("global-lc-wpr", "global + LC + WPR", {"loss": "mulclip", "sap": False}),
    Row("global-sap", "global + SAP", {"loss": "mulclip", "wpr": False, "sap_raw_patches": True}),
    Row("mulclip", "MulCLIP (global + LC + WPR + SAP)", {"loss": "mulclip"}, gradients=True),
    Row("mulclip-clim", "MulCLIP, CLIM instead of WPR", {"loss": "mulclip-clim"}),
    Row("finelip", "FineLIP (global + LC + CLIM)", {"loss": "finelip"}),
    Row("mulclip-sap-all", "MulCLIP, SAP over all pairs", {"loss": "mulclip", "sap_pairing": "all"}),
)
# Variants run on request (``--rows``) to ask why MulCLIP does not pay: the fine-grained weight λ (the
# fine-grained gradients are as large as the global one and nearly orthogonal to it at the start), three
# times the fine-tuning steps for global-only and MulCLIP (at 100 steps no row learns any detail beyond
# colour), and the paper's other knobs: the learning rate (for global-only too, so that each rate has its
# paired baseline), the temperatures τa, τr, τs, the share ρ of context patches, LC off, the
# fine-grained terms starting halfway through fine-tuning; and WPR's cosine form.
KNOB_ROWS = (
    Row(
        "mulclip-lambda-0.1",
        "MulCLIP, λ = 0.1 for WPR and SAP",
        {"loss": "mulclip", "weights": {"wpr": 0.1, "sap": 0.1}},
    ),
    Row("global-300-steps", "global only, 300 steps", {"loss": "global", "steps": 300}),
    Row("mulclip-300-steps", "MulCLIP, 300 steps", {"loss": "mulclip", "steps": 300}),
    Row("global-lr-3e-5", "global only, lr 3e-5", {"loss": "global", "lr": 3e-5}),
    Row("mulclip-lr-3e-5", "MulCLIP, lr 3e-5", {"loss": "mulclip", "lr": 3e-5}),
    Row("global-lr-3e-4", "global only, lr 3e-4", {"loss": "global", "lr": 3e-4}),
    Row("mulclip-lr-3e-4", "MulCLIP, lr 3e-4", {"loss": "mulclip", "lr": 3e-4}),
    Row(
        "mulclip-tau-0.2",
        "MulCLIP, τa = τr = τs = 0.2",
        {"loss": "mulclip", "tau_attn": 0.2, "tau_contrast": 0.2, "tau_sap": 0.2},
        gradients=True,
    ),
    Row("mulclip-rho-0.5", "MulCLIP, ρ = 0.5", {"loss": "mulclip", "sap_topk_ratio": 0.5}, gradients=True),
    Row("mulclip-no-lc", "MulCLIP without LC (raw tokens)", {"loss": "mulclip", "calibration": False}, gradients=True),
    Row("mulclip-late-start", "MulCLIP, terms from halfway", {"loss": "mulclip", "fine_start": 0.5}),
    # The other reading of WPR (docs/method.md, "WPR"): each token aligned with its own reconstruction.
    Row(
        "global-lc-wpr-cosine",
        "global + LC + WPR, cosine form",
        {"loss": "mulclip", "sap": False, "wpr_form": "cosine"},
    ),
    Row("mulclip-wpr-cosine", "MulCLIP, WPR in cosine form", {"loss": "mulclip", "wpr_form": "cosine"}, gradients=True),
)
ALL_ROWS = ROWS + KNOB_ROWS
ROW_KEYS = tuple(row.key for row in ALL_ROWS)


@dataclass(frozen=True)
class StudySettings:
    """The two stages' lengths and rates, the seeds and the evaluation size.

    Pretraining: the towers learn the global alignment of images and short captions (``--captions short``,
    77 text positions), as CLIP did on alt-text. Fine-tuning: every row starts from that checkpoint through
    ``--init openai:PATH`` (77 → 248 positions, the first 20 frozen) and trains for the same steps.
    """

    pretrain_steps: int
    pretrain_lr: float
    finetune_steps: int
    finetune_lr: float
    batch_size: int
    seeds: tuple[int, ...]
    eval_pairs: int
    pretrain_seed: int = 0
    model_overrides: dict = field(default_factory=dict)  # fields of the tiny preset changed in both stages

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Sized to about 45 minutes on a 2-core CPU (41 min measured, 2026-11-30). 500 pretraining steps give
# summary R@5 0.95 / 0.94 (long captions, truncated to 77 tokens: 0.60 / 0.76); 100 fine-tuning steps of
# 32 are 3,200 pairs, a third of DOCCI's training set (docs/study.md).
FULL = StudySettings(
    pretrain_steps=500,
    pretrain_lr=5e-4,
    finetune_steps=100,
    finetune_lr=1e-4,
    batch_size=32,
    seeds=(1, 2, 3),
    eval_pairs=500,
)
# The whole pipeline at toy sizes, for CI: every stage and every row run, numbers meaningless.
QUICK = StudySettings(
    pretrain_steps=3,
    pretrain_lr=5e-4,
    finetune_steps=2,
    finetune_lr=1e-4,
    batch_size=4,
    seeds=(1, 2),
    eval_pairs=16,
    model_overrides={"vision_layers": 1, "transformer_layers": 1},
)
