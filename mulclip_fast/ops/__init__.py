"""Public fused ops (DESIGN §4): drop-in, memory-lean twins of ``mulclip_fast.reference``.

Every op takes ``backend="auto" | "triton" | "torch" | "reference"`` (see ``_dispatch.resolve_backend``).
Within matched pairs (``matched.py``): ``token_reconstruction``, ``wpr_loss``, ``topk_patch_aggregate``.
"""

from .matched import token_reconstruction, topk_patch_aggregate, wpr_loss

__all__ = ["token_reconstruction", "topk_patch_aggregate", "wpr_loss"]
