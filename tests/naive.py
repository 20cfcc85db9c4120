"""Deliberately naive transcriptions of docs/method.md: explicit Python loops over samples and tokens.

They share no code with ``mulclip_fast.reference`` and are written for the eye, not for speed, so the
vectorised reference can be checked against an independent reading of the equations. Inputs are
float64; masks are lists of valid indices computed on the spot.
"""

from __future__ import annotations

import torch


def valid(mask_row) -> list[int]:
    return [i for i, ok in enumerate(mask_row.tolist()) if ok]


def softmax(values: list[torch.Tensor]) -> list[torch.Tensor]:
    top = max(float(v.detach()) for v in values)
    exps = [torch.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / max(float(x.norm()), 1e-12)


def stretch(old: torch.Tensor, keep: int = 20, ratio: int = 4) -> torch.Tensor:
    rows = [old[p] for p in range(keep)]
    n = old.shape[0]
    for i in range(n - keep - 1):
        for r in range(ratio):
            rows.append((1 - r / ratio) * old[keep + i] + (r / ratio) * old[keep + i + 1])
    for r in range(ratio):
        rows.append(old[n - 1] + r * (old[n - 1] - old[n - 2]) / ratio)
    return torch.stack(rows)


def infonce(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """½[CE(S, diag) + CE(Sᵀ, diag)] with S = scale·a bᵀ, row by row."""
    n = a.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        row = [scale * a[i] @ b[j] for j in range(n)]
        col = [scale * a[j] @ b[i] for j in range(n)]
        total = total - torch.log(softmax(row)[i]) - torch.log(softmax(col)[i])
    return total / (2 * n)


def reconstruct(q, kv, q_mask, kv_mask, tau):
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        keys = valid(kv_mask[b])
        for i in valid(q_mask[b]):
            if not keys:
                continue
            weights = softmax([q[b, i] @ kv[b, j] / tau for j in keys])
            out[b, i] = sum(w * kv[b, j] for w, j in zip(weights, keys, strict=True))
    return out


def in_sample_infonce(x, x_rec, idx, tau):
    terms = []
    for j in idx:
        probs = softmax([x[j] @ x_rec[k] / tau for k in idx])
        terms.append(-torch.log(probs[idx.index(j)]))
    return sum(terms) / len(terms)


def _per_sample_wpr(v, t, v_mask, t_mask, tau_attn, side_loss):
    """side_loss(tokens, rebuilt, valid) summed over both sides, per sample [B] (0 without tokens on a side)."""
    v_rec = reconstruct(v, t, v_mask, t_mask, tau_attn)
    t_rec = reconstruct(t, v, t_mask, v_mask, tau_attn)
    losses = []
    for b in range(v.shape[0]):
        vi, ti = valid(v_mask[b]), valid(t_mask[b])
        if not vi or not ti:
            losses.append(torch.zeros((), dtype=torch.float64))
            continue
        v_hat = torch.stack([normalize(r) for r in v_rec[b]])
        t_hat = torch.stack([normalize(r) for r in t_rec[b]])
        losses.append(side_loss(v[b], v_hat, vi) + side_loss(t[b], t_hat, ti))
    return torch.stack(losses)


def wpr_loss(v, t, v_mask, t_mask, tau_attn, tau_contrast):
    """Returns the per-sample losses [B] (0 for a sample without valid tokens on a side)."""
    return _per_sample_wpr(
        v, t, v_mask, t_mask, tau_attn, lambda x, x_hat, idx: in_sample_infonce(x, x_hat, idx, tau_contrast)
    )


def wpr_cosine_loss(v, t, v_mask, t_mask, tau_attn):
    """Per-sample mean_j (1 − ⟨v_j, ṽ_j⟩) + mean_k (1 − ⟨t_k, t̃_k⟩) [B] (0 without valid tokens on a side)."""
    return _per_sample_wpr(
        v, t, v_mask, t_mask, tau_attn, lambda x, x_hat, idx: sum(1 - x[j] @ x_hat[j] for j in idx) / len(idx)
    )


def topk_aggregate_one(query, patches, patch_idx, k, tau):
    """normalize(Σ_{j∈top-k} softmax(s_j/τ) x_j) for one query against one image's valid patches."""
    scores = {j: query @ patches[j] for j in patch_idx}
    chosen = sorted(patch_idx, key=lambda j: -float(scores[j]))[:k]
    weights = softmax([scores[j] / tau for j in chosen])
    return normalize(sum(w * patches[j] for w, j in zip(weights, chosen, strict=True)))


def topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, tau):
    out = torch.zeros_like(sub)
    for b in range(sub.shape[0]):
        for i in valid(sub_mask[b]):
            out[b, i] = topk_aggregate_one(sub[b, i], patches[b], valid(patch_mask[b]), k, tau)
    return out


def sap_loss_matched(sub, patches, sub_mask, patch_mask, k, tau, scale):
    agg = topk_patch_aggregate(sub, patches, sub_mask, patch_mask, k, tau)
    slot_losses = []
    for i in range(sub.shape[1]):
        rows = [b for b in range(sub.shape[0]) if sub_mask[b, i]]
        if len(rows) >= 2:
            slot_losses.append(infonce(agg[rows, i], sub[rows, i], scale))
    return sum(slot_losses) / len(slot_losses) if slot_losses else torch.zeros((), dtype=torch.float64)


def pairwise_maxsim(q, k, q_mask, k_mask, bidirectional, negative_slope):
    def f(x):
        return x if negative_slope is None or x >= 0 else negative_slope * x

    out = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for b in range(q.shape[0]):
        for c in range(k.shape[0]):
            qi, kj = valid(q_mask[b]), valid(k_mask[c])
            if qi and kj:
                out[b, c] = sum(max(f(q[b, i] @ k[c, j]) for j in kj) for i in qi) / len(qi)
                if bidirectional:
                    out[b, c] += sum(max(f(q[b, i] @ k[c, j]) for i in qi) for j in kj) / len(kj)
    return out


def pairwise_reconstruction_scores(q, k, q_mask, k_mask, tau):
    out = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for b in range(q.shape[0]):
        for c in range(k.shape[0]):
            qi, kj = valid(q_mask[b]), valid(k_mask[c])
            if not qi or not kj:
                continue
            total = 0.0
            for i in qi:
                weights = softmax([q[b, i] @ k[c, j] / tau for j in kj])
                rebuilt = sum(w * k[c, j] for w, j in zip(weights, kj, strict=True))
                total = total + q[b, i] @ rebuilt
            out[b, c] = total / len(qi)
    return out


def pairwise_topk_aggregate_cosines(sub, patches, sub_mask, patch_mask, k, tau):
    out = torch.zeros(sub.shape[0], patches.shape[0], sub.shape[1], dtype=torch.float64)
    for b in range(sub.shape[0]):
        for c in range(patches.shape[0]):
            for i in valid(sub_mask[b]):
                out[b, c, i] = sub[b, i] @ topk_aggregate_one(sub[b, i], patches[c], valid(patch_mask[c]), k, tau)
    return out


def finelip_hinge(scores, margin, hardest):
    n = scores.shape[0]
    t2i = [[max(0.0, margin + float(scores[b, c] - scores[b, b])) for c in range(n) if c != b] for b in range(n)]
    i2t = [[max(0.0, margin + float(scores[b, c] - scores[c, c])) for b in range(n) if b != c] for c in range(n)]
    pick = (lambda xs: max(xs, default=0.0)) if hardest else sum
    return (sum(pick(r) for r in t2i) + sum(pick(r) for r in i2t)) / n


def calibrate(x, mask, mlp, alpha):
    """X' = softmax_N(α·MLP(X)ᵀ)·X over the valid tokens of each sample."""
    out = []
    for b in range(x.shape[0]):
        idx = valid(mask[b])
        z = mlp(x[b])  # [N, N']
        rows = []
        for o in range(z.shape[1]):
            if not idx:
                rows.append(torch.zeros(x.shape[2], dtype=x.dtype))
                continue
            weights = softmax([alpha * z[j, o] for j in idx])
            rows.append(sum(w * x[b, j] for w, j in zip(weights, idx, strict=True)))
        out.append(torch.stack(rows))
    return torch.stack(out)
