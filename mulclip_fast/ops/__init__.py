"""Public fused ops (docs/kernels.md): drop-in, memory-lean twins of ``mulclip_fast.reference``.

Every op takes ``backend="auto" | "triton" | "torch" | "reference"`` (see ``_dispatch.resolve_backend``);
the top-k aggregates also ``"cpp"`` and ``"cuda_ext"``, the C++/CUDA extension of ``csrc/``.
Within matched pairs (``matched.py``): ``token_reconstruction``, ``wpr_loss``, ``topk_patch_aggregate``.
Over all pairs of a batch (``pairwise.py``): ``pairwise_maxsim``, ``pairwise_reconstruction_scores``,
``pairwise_topk_aggregate_cosines`` (formerly ``pairwise_topk_aggregate_logits``, a name still accepted with a
``DeprecationWarning``).
"""

from .matched import token_reconstruction, topk_patch_aggregate, wpr_loss
from .pairwise import pairwise_maxsim, pairwise_reconstruction_scores, pairwise_topk_aggregate_cosines

# The deprecated alias is importable but not listed in __all__: the public ops are each op once.
from .pairwise import pairwise_topk_aggregate_logits as pairwise_topk_aggregate_logits

__all__ = [
    "pairwise_maxsim",
    "pairwise_reconstruction_scores",
    "pairwise_topk_aggregate_cosines",
    "token_reconstruction",
    "topk_patch_aggregate",
    "wpr_loss",
]
