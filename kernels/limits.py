"""Input sizes the Triton kernels take, importable without Triton (the ops consult them to pick a backend).

The top-k kernels (``topk_aggregate``, ``pairwise_topk``) hold a ``[16, N]`` score tile of every patch
of an image in registers: up to 256 patches (ViT-B/16's 196, ViT-L/14's 256 at 224 px) it compiles
without spills for sm_80 and sm_90 (``python -m mulclip_fast.kernels.compile_check``); from 512 on it
spills, so larger patch sets take the chunked torch path.
"""

TOPK_MAX_PATCHES = 256
