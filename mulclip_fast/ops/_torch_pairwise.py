"""Chunked PyTorch bodies of the all-pairs ops, forward and backward by hand (docs/kernels.md, "All-pairs ops").

These are the memory-lean ``torch`` backend of ``mulclip_fast.ops.pairwise``. The quadratic tensor
(``[Bq, Bk, Lq, Lk]`` similarities, ``[Bq, Bk, M, d]`` aggregates) exists for one chunk of
(query sets × key sets) at a time. Forward passes keep only per-(query set, key set, token) statistics
— the arg-max for max-sim, ``(r, lse)`` for reconstruction, a bit-packed top-k selection and ``lse``
for SAP — and backward passes recompute each chunk's similarities from the inputs.

Statistics are laid out key-set-major like the Triton kernels': ``stat[c, b, i]`` for key set ``c``,
query set ``b``, query token ``i``, so both backends return identically shaped tensors.

All arithmetic is in the accumulation dtype (float32, float64 for float64 inputs); inputs of lower
precision are upcast one chunk at a time, so no full-size float32 copy of them is made.
"""

from __future__ import annotations

import math

import torch

from ..reference.masking import accumulation_dtype
from ._torch_matched import topk_selection

# F.normalize's epsilon: the reference normalises the SAP aggregate with F.normalize(x, dim=-1).
NORMALIZE_EPS = 1e-12

# Elements of one chunk buffer (the [c_q, Lq, c_k, Lk] similarities and their companions): a sixteenth of
# the elements of the inputs, so that the two or three live chunk buffers stay well below the inputs'
# gradients, which any implementation must allocate (the ≤ 1.5× peak-memory bound at paper shapes), but
# never below 4 MiB or above 16 MiB of float32. Larger chunks run faster on a CPU (fewer, larger GEMMs:
# measured in docs/performance.md, "All-pairs ops").
MIN_CHUNK_ELEMENTS = 1 << 20
MAX_CHUNK_ELEMENTS = 1 << 22
# Overrides the size-derived budget when set (tests, experiments).
CHUNK_ELEMENTS: int | None = None


def chunk_budget(*inputs: torch.Tensor) -> int:
    """Elements per chunk buffer for ops on ``inputs``: :data:`CHUNK_ELEMENTS` if set, else a sixteenth
    of the inputs' elements, clamped to [:data:`MIN_CHUNK_ELEMENTS`, :data:`MAX_CHUNK_ELEMENTS`]."""
    if CHUNK_ELEMENTS is not None:
        return CHUNK_ELEMENTS
    return min(MAX_CHUNK_ELEMENTS, max(MIN_CHUNK_ELEMENTS, sum(x.numel() for x in inputs) // 16))


def _chunks(n: int, size: int):
    """``[start, end)`` ranges of at most ``size`` covering ``range(n)``, as equal as possible: 32 sets in
    chunks of 26 become 16 + 16, not 26 + 6 (a GEMM on 6 sets runs far below the CPU's peak)."""
    count = -(-n // size)
    size = -(-n // count) if count else size
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _chunk_counts(n_q: int, n_k: int, per_pair: int, budget: int) -> tuple[int, int]:
    """(query sets, key sets) per chunk so that a chunk holds about ``budget`` elements of ``per_pair`` each."""
    pairs = max(1, budget // max(1, per_pair))
    per_side = max(1, math.isqrt(pairs))
    # At least one set per chunk: an empty batch (0 sets) then has no chunks at all.
    n_k_chunk = max(1, min(n_k, per_side))
    n_q_chunk = max(1, min(n_q, pairs // n_k_chunk))
    return n_q_chunk, n_k_chunk


def _activation_slope(values: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    """``f'(raw)`` of LeakyReLU at the max, from the activated max itself: ``f(raw) > 0 ⟺ raw > 0``."""
    if negative_slope is None:
        return torch.ones_like(values)
    return torch.where(values > 0, 1.0, negative_slope).to(values.dtype)


# --------------------------------------------------------------------------------------------------
# Late-interaction max-sim
# --------------------------------------------------------------------------------------------------


def maxsim_forward(q, k, q_mask, k_mask, bidirectional: bool, negative_slope: float | None):
    """Per-token maxima of ``f(⟨q_bi, k_cj⟩)`` for every (query set, key set).

    Returns ``(val_qk, idx_qk, val_kq, idx_kq)``: ``val_qk[c, b, i] = max_{j valid} f(sim)`` (0 when key
    set ``c`` is empty) and its arg-max ``idx_qk`` (int32); with ``bidirectional`` likewise
    ``val_kq[b, c, j] = max_{i valid} f(sim)`` over the query tokens, else empty ``[Bq, Bk, 0]`` tensors.
    """
    acc = accumulation_dtype(q)
    (n_q, len_q, d), (n_k, len_k, _) = q.shape, k.shape
    val_qk = q.new_zeros((n_k, n_q, len_q), dtype=acc)
    idx_qk = q.new_zeros((n_k, n_q, len_q), dtype=torch.int32)
    kq_len = len_k if bidirectional else 0
    val_kq = q.new_zeros((n_q, n_k, kq_len), dtype=acc)
    idx_kq = q.new_zeros((n_q, n_k, kq_len), dtype=torch.int32)
    if len_q == 0 or len_k == 0:  # every set of one side is empty: the zero statistics are its values
        return val_qk, idx_qk, val_kq, idx_kq
    k_any, q_any = k_mask.any(dim=1), q_mask.any(dim=1)
    cq, ck = _chunk_counts(n_q, n_k, len_q * len_k, chunk_budget(q, k))
    for b0, b1 in _chunks(n_q, cq):
        qc = q[b0:b1].to(acc).reshape(-1, d)
        for c0, c1 in _chunks(n_k, ck):
            kc = k[c0:c1].to(acc).reshape(-1, d)
            sim = (qc @ kc.T).view(b1 - b0, len_q, c1 - c0, len_k)
            if negative_slope is not None:
                torch.nn.functional.leaky_relu_(sim, negative_slope)
            sim.masked_fill_(~k_mask[None, None, c0:c1], float("-inf"))
            best, arg = sim.max(dim=3)  # [nb, Lq, nc]
            best.masked_fill_(~k_any[None, None, c0:c1], 0.0)
            val_qk[c0:c1, b0:b1] = best.permute(2, 0, 1)
            idx_qk[c0:c1, b0:b1] = arg.permute(2, 0, 1).to(torch.int32)
            if bidirectional:
                # The key → query direction reuses the same chunk: invalid query tokens are excluded
                # from the max; invalid key columns (-inf above) are dropped by the mean's mask.
                sim.masked_fill_(~q_mask[b0:b1, :, None, None], float("-inf"))
                best, arg = sim.max(dim=1)  # [nb, nc, Lk]
                best = torch.where(q_any[b0:b1, None, None] & k_mask[None, c0:c1], best, 0.0)
                val_kq[b0:b1, c0:c1] = best
                idx_kq[b0:b1, c0:c1] = arg.to(torch.int32)
    return val_qk, idx_qk, val_kq, idx_kq


def maxsim_scores(val_qk, val_kq, q_mask, k_mask, bidirectional: bool, out_dtype):
    """``S[b, c] = mean_{i valid} val_qk[c, b, i]`` (+ ``mean_{j valid} val_kq[b, c, j]``)."""
    n_q = q_mask.sum(dim=1).clamp(min=1).to(val_qk.dtype)
    scores = (val_qk * q_mask[None]).sum(dim=2).T / n_q[:, None]
    if bidirectional:
        n_k = k_mask.sum(dim=1).clamp(min=1).to(val_kq.dtype)
        scores = scores + (val_kq * k_mask[None]).sum(dim=2) / n_k[None, :]
    return scores.to(out_dtype).contiguous()  # the fake implementation promises a contiguous [Bq, Bk]


def maxsim_row_weights(grad, q_mask, k_mask, val_qk, val_kq, bidirectional, negative_slope, n_q=None, n_k=None):
    """``∂L/∂sim`` at each arg-max: ``grad[b, c] / n_valid · f'(sim)`` on valid tokens of non-empty sets.

    Returns ``(w_qk [Bk, Bq, Lq], w_kq [Bq, Bk, Lk])`` in the accumulation dtype (shared with the Triton
    path). Works on any block of query and key sets; ``n_q``/``n_k`` give the valid-token counts when the
    masks are blocks of larger ones (they are the masks' row sums otherwise).
    """
    grad = grad.to(val_qk.dtype)
    k_any, q_any = k_mask.any(dim=1), q_mask.any(dim=1)
    n_q = (q_mask.sum(dim=1) if n_q is None else n_q).clamp(min=1)
    w_qk = (grad.T / n_q[None, :])[:, :, None] * (q_mask[None] & k_any[:, None, None])
    w_qk = w_qk * _activation_slope(val_qk, negative_slope)
    w_kq = val_kq.new_zeros(val_kq.shape)
    if bidirectional:
        n_k = (k_mask.sum(dim=1) if n_k is None else n_k).clamp(min=1)
        w_kq = (grad / n_k[None, :])[:, :, None] * (k_mask[None] & q_any[:, None, None])
        w_kq = w_kq * _activation_slope(val_kq, negative_slope)
    return w_qk, w_kq


def maxsim_backward(grad, q, k, q_mask, k_mask, val_qk, idx_qk, val_kq, idx_kq, bidirectional, negative_slope):
    """Gradients of :func:`maxsim_forward` + :func:`maxsim_scores` w.r.t. ``q`` and ``k``.

    Each max passes its weight to one pair of tokens: a chunk's one-hot weight matrix ``W[bi, cj]`` is
    rebuilt from the saved arg-maxes, then ``dq = W k`` and ``dk = Wᵀ q`` (two matmuls per chunk).
    """
    acc = accumulation_dtype(q)
    (n_q, len_q, d), (n_k, len_k, _) = q.shape, k.shape
    dq = torch.zeros((n_q * len_q, d), dtype=acc, device=q.device)
    dk = torch.zeros((n_k * len_k, d), dtype=acc, device=k.device)
    if len_q == 0 or len_k == 0:  # no token pair, no max: the scores are constant 0
        return dq.view(q.shape), dk.view(k.shape)
    cq, ck = _chunk_counts(n_q, n_k, len_q * len_k, chunk_budget(q, k))
    for b0, b1 in _chunks(n_q, cq):
        qc = q[b0:b1].to(acc).reshape(-1, d)
        for c0, c1 in _chunks(n_k, ck):
            kc = k[c0:c1].to(acc).reshape(-1, d)
            w_qk, w_kq = maxsim_row_weights(
                grad[b0:b1, c0:c1],
                q_mask[b0:b1],
                k_mask[c0:c1],
                val_qk[c0:c1, b0:b1],
                val_kq[b0:b1, c0:c1],
                bidirectional,
                negative_slope,
                n_q=q_mask.sum(dim=1)[b0:b1],
                n_k=k_mask.sum(dim=1)[c0:c1],
            )
            weights = qc.new_zeros((b1 - b0, len_q, c1 - c0, len_k))
            index = idx_qk[c0:c1, b0:b1].permute(1, 2, 0)[..., None].long()  # [nb, Lq, nc, 1]
            weights.scatter_add_(3, index, w_qk.permute(1, 2, 0)[..., None])
            if bidirectional:
                index = idx_kq[b0:b1, c0:c1][:, None].long()  # [nb, 1, nc, Lk]
                weights.scatter_add_(1, index, w_kq[:, None])
            weights = weights.view(qc.shape[0], kc.shape[0])
            dq[b0 * len_q : b1 * len_q].addmm_(weights, kc)
            dk[c0 * len_k : c1 * len_k].addmm_(weights.T, qc)
    return dq.view(q.shape), dk.view(k.shape)


# --------------------------------------------------------------------------------------------------
# Reconstruction scores
# --------------------------------------------------------------------------------------------------


def _scaled_logits(q_scaled, kc, k_mask_chunk, shape):
    """``z = sim / τ`` for one chunk (τ already folded into ``q_scaled``), invalid keys set to the dtype's
    lowest finite value (as the reference's masked softmax does): their ``exp`` is 0 and ``0 · z`` stays 0."""
    z = (q_scaled @ kc.T).view(shape)
    if not bool(k_mask_chunk.all()):
        z.masked_fill_(~k_mask_chunk[None, None], torch.finfo(z.dtype).min)
    return z


def reconstruction_forward(q, k, q_mask, k_mask, tau: float):
    """Per-token ``r[c, b, i] = Σ_j p_ij ⟨q_bi, k_cj⟩`` with ``p = softmax_j(sim / τ)`` over valid keys.

    Returns ``(r, lse)``, both ``[Bk, Bq, Lq]``: ``lse`` is the log-sum-exp of ``sim / τ`` over valid keys
    (0 for an empty key set, where ``r`` is 0 too). Works on ``z = sim / τ`` only (``r = τ Σ_j p_ij z_ij``),
    so a chunk holds two buffers and each element is touched by few passes.
    """
    acc = accumulation_dtype(q)
    (n_q, len_q, d), (n_k, len_k, _) = q.shape, k.shape
    r = q.new_zeros((n_k, n_q, len_q), dtype=acc)
    lse = q.new_zeros((n_k, n_q, len_q), dtype=acc)
    if len_k == 0:  # every key set is empty: r and lse are 0
        return r, lse
    k_empty = ~k_mask.any(dim=1)
    cq, ck = _chunk_counts(n_q, n_k, len_q * len_k, chunk_budget(q, k))
    for b0, b1 in _chunks(n_q, cq):
        q_scaled = q[b0:b1].to(acc).reshape(-1, d) / tau
        for c0, c1 in _chunks(n_k, ck):
            kc = k[c0:c1].to(acc).reshape(-1, d)
            z = _scaled_logits(q_scaled, kc, k_mask[c0:c1], (b1 - b0, len_q, c1 - c0, len_k))
            top = z.amax(dim=3, keepdim=True)
            e = (z - top).exp_()
            total = e.sum(dim=3)
            weighted = e.mul_(z).sum(dim=3)  # Σ_j exp(z_j − top) z_j
            chunk_r = weighted.div_(total).mul_(tau)
            chunk_lse = total.log_().add_(top[..., 0])
            empty = k_empty[None, None, c0:c1]
            r[c0:c1, b0:b1] = chunk_r.masked_fill_(empty, 0.0).permute(2, 0, 1)
            lse[c0:c1, b0:b1] = chunk_lse.masked_fill_(empty, 0.0).permute(2, 0, 1)
    return r, lse


def reconstruction_scores(r, q_mask, out_dtype):
    """``S[b, c] = mean_{i valid} r[c, b, i]``."""
    n_q = q_mask.sum(dim=1).clamp(min=1).to(r.dtype)
    return ((r * q_mask[None]).sum(dim=2).T / n_q[:, None]).to(out_dtype).contiguous()


def reconstruction_row_weights(grad, q_mask, dtype, n_q=None):
    """``g[c, b, i] = grad[b, c] / n_valid(b)`` on valid query tokens: ``[Bk, Bq, Lq]`` (any block of sets)."""
    n_q = (q_mask.sum(dim=1) if n_q is None else n_q).clamp(min=1)
    return (grad.to(dtype).T / n_q[None, :])[:, :, None] * q_mask[None]


def reconstruction_backward(grad, q, k, q_mask, k_mask, tau: float, r, lse):
    """Gradients of the reconstruction scores w.r.t. ``q`` and ``k``.

    With ``r_i = Σ_j p_ij s_ij`` and ``p = softmax(s / τ)``: ``∂r_i/∂s_ij = p_ij (1 + (s_ij − r_i) / τ)``.
    So ``dS = g ∘ p ∘ (1 + z − r/τ)`` with ``z = s/τ``, ``dq = dS k`` and ``dk = dSᵀ q``, chunk by chunk,
    with ``z`` and ``p = exp(z − lse)`` recomputed from the inputs and the saved ``lse``.
    """
    acc = accumulation_dtype(q)
    (n_q, len_q, d), (n_k, len_k, _) = q.shape, k.shape
    dq = torch.zeros((n_q * len_q, d), dtype=acc, device=q.device)
    dk = torch.zeros((n_k * len_k, d), dtype=acc, device=k.device)
    n_valid = q_mask.sum(dim=1)
    k_any = k_mask.any(dim=1)
    cq, ck = _chunk_counts(n_q, n_k, len_q * len_k, chunk_budget(q, k))
    for b0, b1 in _chunks(n_q, cq):
        qc = q[b0:b1].to(acc).reshape(-1, d)
        q_scaled = qc / tau
        for c0, c1 in _chunks(n_k, ck):
            kc = k[c0:c1].to(acc).reshape(-1, d)
            z = _scaled_logits(q_scaled, kc, k_mask[c0:c1], (b1 - b0, len_q, c1 - c0, len_k))
            p = (z - lse[c0:c1, b0:b1].permute(1, 2, 0)[..., None]).exp_()
            # g is 0 for invalid queries and empty key sets (whose p would be meaningless)
            g = reconstruction_row_weights(grad[b0:b1, c0:c1], q_mask[b0:b1], acc, n_valid[b0:b1])
            g = (g * k_any[c0:c1, None, None]).permute(1, 2, 0)[..., None]  # [nb, Lq, nc, 1]
            bias = g * (1.0 - r[c0:c1, b0:b1].permute(1, 2, 0)[..., None] / tau)
            # g p (1 + z − r/τ) = g·(p z) + bias·p, in z's storage. p z first: a masked key has the
            # dtype's lowest z and p = 0, so p z = 0, where g z alone would overflow to ±inf once |g| > 1
            # (and inf · 0 is NaN).
            ds = z.mul_(p).mul_(g).addcmul_(p, bias)
            ds = ds.view(qc.shape[0], kc.shape[0])
            dq[b0 * len_q : b1 * len_q].addmm_(ds, kc)
            dk[c0 * len_k : c1 * len_k].addmm_(ds.T, qc)
    return dq.view(q.shape), dk.view(k.shape)


# --------------------------------------------------------------------------------------------------
# Top-k SAP logits over all pairs
# --------------------------------------------------------------------------------------------------


def pack_bits(selected: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[..., N]`` selection into ``uint8 [..., ceil(N / 8)]``, bit ``n % 8`` of byte ``n // 8``."""
    n = selected.shape[-1]
    padded = torch.nn.functional.pad(selected, (0, (-n) % 8)).view(*selected.shape[:-1], -1, 8)
    shifts = torch.arange(8, device=selected.device, dtype=torch.uint8)
    return (padded.to(torch.uint8) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: bool ``[..., n]``."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    bits = (packed[..., None] >> shifts) & 1
    return bits.view(*packed.shape[:-1], -1)[..., :n].bool()


def _cosines_chunk_counts(n_rows: int, n_k: int, n_patches: int, d: int, budget: int) -> tuple[int, int]:
    # Per (row, key set) a chunk holds N-sized score tiles and d-sized aggregates.
    return _chunk_counts(n_rows, n_k, 3 * n_patches + 2 * d, budget)


def topk_aggregate_cosines_forward(sub, patches, sub_mask, patch_mask, k: int, tau: float):
    """Top-k SAP logits ``out[b, c, m] = ⟨t, normalize(Σ_{n∈top-k} w_n x_cn)⟩`` for every pair.

    Rows ``r = b·M + m`` are the subcaptions. Returns ``(logits [Bq, Bk, M], selected, lse)`` with
    ``selected`` the bit-packed top-k set ``uint8 [Bk, Bq·M, ceil(N/8)]`` and ``lse [Bk, Bq·M]`` the
    log-sum-exp of ``s / τ`` over it (0 for an empty patch set).
    """
    acc = accumulation_dtype(sub)
    (n_q, n_sub, d), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows = n_q * n_sub
    rows = sub.reshape(n_rows, d)
    logits = sub.new_zeros((n_rows, n_k), dtype=acc)
    selected = sub.new_zeros((n_k, n_rows, (n_patch + 7) // 8), dtype=torch.uint8)
    lse = sub.new_zeros((n_k, n_rows), dtype=acc)
    take = min(k, n_patch)
    cr, ck = _cosines_chunk_counts(n_rows, n_k, n_patch, d, chunk_budget(sub, patches))
    for r0, r1 in _chunks(n_rows, cr):
        t = rows[r0:r1].to(acc)
        for c0, c1 in _chunks(n_k, ck):
            x = patches[c0:c1].to(acc)
            valid = patch_mask[None, c0:c1]  # [1, nc, N]
            s = (t @ x.reshape(-1, d).T).view(r1 - r0, c1 - c0, n_patch)
            sel = topk_selection(s, valid, take)
            w, row_lse = _selection_softmax(s, sel, tau)
            agg = torch.bmm(w.transpose(0, 1), x)  # [nc, nr, d]
            norm = agg.norm(dim=2).clamp_min_(NORMALIZE_EPS)
            logits[r0:r1, c0:c1] = (torch.einsum("crd,rd->cr", agg, t) / norm).T
            selected[c0:c1, r0:r1] = pack_bits(sel.transpose(0, 1))
            lse[c0:c1, r0:r1] = row_lse.T
    logits = logits * sub_mask.reshape(n_rows, 1)
    return logits.view(n_q, n_sub, n_k).transpose(1, 2).to(sub.dtype).contiguous(), selected, lse


def _selection_softmax(s, sel, tau, lse=None):
    """``w = softmax(s / τ)`` over the selected patches (0 elsewhere) and its log-sum-exp (0 if none)."""
    z = (s / tau).masked_fill_(~sel, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(z, dim=-1).masked_fill_(~sel.any(dim=-1), 0.0)
    return z.sub_(lse[..., None]).exp_(), lse


def topk_aggregate_cosines_backward(grad, sub, patches, sub_mask, patch_mask, tau: float, selected, lse):
    """Gradients of :func:`topk_aggregate_cosines_forward` w.r.t. ``sub`` and ``patches``.

    For one (subcaption t, image c) with selected weights ``w``, aggregate ``a = Σ w_n x_n``, ``ν = ‖a‖``,
    ``u = a / ν``, ``out = ⟨t, u⟩``, ``s_n = ⟨t, x_n⟩``, ``q_n = ⟨u, x_n⟩`` and upstream ``g``::

        ∂out/∂s_n = w_n (s_n − out·q_n) / (τ ν)          (the softmax's centring term vanishes: ⟨t − out·u, a⟩ = 0)
        dt  = Σ_n α_n x_n,            α_n = g (w_n / ν + ∂out/∂s_n)
        dx_n = α_n t + β_n u,          β_n = −g w_n out / ν
    """
    acc = accumulation_dtype(sub)
    (n_q, n_sub, d), (n_k, n_patch, _) = sub.shape, patches.shape
    n_rows = n_q * n_sub
    rows = sub.reshape(n_rows, d)
    g_all = (grad.to(acc).transpose(1, 2) * sub_mask[:, :, None]).reshape(n_rows, n_k)
    d_rows = torch.zeros((n_rows, d), dtype=acc, device=sub.device)
    d_patches = torch.zeros((n_k * n_patch, d), dtype=acc, device=patches.device)
    cr, ck = _cosines_chunk_counts(n_rows, n_k, n_patch, d, chunk_budget(sub, patches))
    for r0, r1 in _chunks(n_rows, cr):
        t = rows[r0:r1].to(acc)
        for c0, c1 in _chunks(n_k, ck):
            x = patches[c0:c1].to(acc)
            s = (t @ x.reshape(-1, d).T).view(r1 - r0, c1 - c0, n_patch)
            sel = unpack_bits(selected[c0:c1, r0:r1], n_patch).transpose(0, 1)
            w, _ = _selection_softmax(s, sel, tau, lse[c0:c1, r0:r1].T)
            w_c = w.transpose(0, 1)  # [nc, nr, N]
            agg = torch.bmm(w_c, x)  # [nc, nr, d]
            norm = agg.norm(dim=2, keepdim=True).clamp_min_(NORMALIZE_EPS)
            u = agg.div_(norm)
            out = torch.einsum("crd,rd->cr", u, t)[..., None]  # [nc, nr, 1]
            q_proj = torch.bmm(u, x.transpose(1, 2))  # [nc, nr, N]
            g = g_all[r0:r1, c0:c1].T[..., None]  # [nc, nr, 1]
            s_c = s.transpose(0, 1)
            ds = (s_c - out * q_proj).mul_(w_c).div_(norm * tau)
            alpha = (w_c / norm).add_(ds).mul_(g)
            beta = (w_c * out).div_(norm).mul_(-g)
            # accumulate in place: no [nc, N, d] temporaries
            d_rows[r0:r1].addmm_(alpha.transpose(0, 1).reshape(r1 - r0, -1), x.reshape(-1, d))
            alpha_t = alpha.transpose(1, 2).reshape(-1, r1 - r0)  # [nc·N, nr]
            d_patches[c0 * n_patch : c1 * n_patch].addmm_(alpha_t, t)
            d_patches[c0 * n_patch : c1 * n_patch].view(c1 - c0, n_patch, d).baddbmm_(beta.transpose(1, 2), u)
    return d_rows.view(n_q, n_sub, d), d_patches.view(patches.shape)
