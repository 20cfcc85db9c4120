// SAP's top-k softmax aggregate of patches, per row, written once for the CPU twin and the CUDA kernels
// (docs/kernels.md, "The C++/CUDA extension"; the math is docs/method.md, "SAP").
//
// Every function works on one row (one subcaption of one sample) and is generic over a Team: the
// threads that share the row. The CPU twin passes a team of one thread (SerialTeam below); the CUDA
// kernels pass a thread block whose sum/max are block reductions in shared memory. Loops over patches
// and channels are strided by the team (`for (j = team.rank(); j < n; j += team.size())`), and every
// value a lane reads that another lane wrote is behind a team.sync(), so the same text is correct for
// both. Reductions run in a fixed order, so results (and gradients) are deterministic.
//
// This header includes no PyTorch and no CUDA header: the .cu file compiles on its own with nvcc.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define MULCLIP_HD __host__ __device__ __forceinline__
#else
#define MULCLIP_HD inline
#endif

namespace mulclip_fast {

// F.normalize's epsilon: the reference normalises the aggregate with F.normalize(x, dim=-1).
constexpr float kNormalizeEps = 1e-12f;

// A team of one: the CPU twin runs each row on one thread.
struct SerialTeam {
  MULCLIP_HD int rank() const { return 0; }
  MULCLIP_HD int size() const { return 1; }
  MULCLIP_HD void sync() const {}
  MULCLIP_HD float sum(float x) const { return x; }
  MULCLIP_HD int count(int x) const { return x; }
  MULCLIP_HD float max(float x) const { return x; }
};

// uint32 key ordered like the float z: positive floats get the sign bit set, negative ones are
// bit-inverted. -0.0 is folded into +0.0 first so that, as in float comparisons, the two zeros tie.
MULCLIP_HD uint32_t order_key(float z) {
  if (z == 0.0f) z = 0.0f;
  uint32_t bits;
  memcpy(&bits, &z, sizeof bits);
  return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

// Key of a masked patch: below every float's key (order_key(-inf) = 0x007FFFFF), so a masked patch is
// never above or tied with a valid one.
constexpr uint32_t kMaskedKey = 0u;

// The selection of one row, under the rule every backend shares (kernels/topk_select.py): exactly
// min(take, valid) valid patches, the largest scores, ties at the take-th value broken towards the
// lowest index. A patch j is selected when its key is above `kth`, or equal to it with j <= last_tied.
struct RowSelection {
  uint32_t kth;
  int last_tied;
};

MULCLIP_HD bool is_selected(float score, bool valid, int j, RowSelection sel) {
  if (!valid) return false;
  const uint32_t key = order_key(score);
  return key > sel.kth || (key == sel.kth && j <= sel.last_tied);
}

// scores[j] = <query, patches[j]> in fp32 for the n patches of one sample (row stride d).
template <class Team, class T>
MULCLIP_HD void row_scores(const Team& team, const T* query, const T* patches, int n, int d, float* scores) {
  for (int j = team.rank(); j < n; j += team.size()) {
    const T* patch = patches + static_cast<int64_t>(j) * d;
    float acc = 0.0f;
    for (int c = 0; c < d; ++c) acc += static_cast<float>(query[c]) * static_cast<float>(patch[c]);
    scores[j] = acc;
  }
  team.sync();
}

// Radix select of the take-th largest key, from the most significant bit down: a bit is kept when at
// least `take` keys are >= the candidate (32 count passes, no sorted copy). When fewer than `take`
// patches are valid, the take-th key is a masked one, so every valid patch is above it. The tie cut is
// found the same way over indices: the largest c with fewer than `need` tied patches below it is the
// need-th tied patch.
template <class Team>
MULCLIP_HD RowSelection select_topk(const Team& team, const float* scores, const bool* valid, int n, int take) {
  uint32_t kth = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t candidate = kth | (1u << bit);
    int local = 0;
    for (int j = team.rank(); j < n; j += team.size())
      local += (valid[j] ? order_key(scores[j]) : kMaskedKey) >= candidate;
    if (team.count(local) >= take) kth = candidate;
  }
  int local_above = 0;
  for (int j = team.rank(); j < n; j += team.size()) local_above += valid[j] && order_key(scores[j]) > kth;
  const int need = take - team.count(local_above);
  int index_bits = 0;
  while ((1 << index_bits) < n) ++index_bits;
  int last = 0;
  for (int bit = index_bits - 1; bit >= 0; --bit) {
    const int candidate = last | (1 << bit);
    int local = 0;
    for (int j = team.rank(); j < n && j < candidate; j += team.size())
      local += valid[j] && order_key(scores[j]) == kth;
    if (team.count(local) < need) last = candidate;
  }
  return RowSelection{kth, last};
}

// Overwrites scores[j] with the softmax weight of patch j over the selection, softmax(s / tau); 0 off
// the selection (and everywhere in a row without a valid patch). Returns the log-sum-exp of s / tau over
// the selection (0 for an empty one), which the all-pairs backward rebuilds the weights from.
template <class Team>
MULCLIP_HD float softmax_weights(const Team& team, float* scores, const bool* valid, int n, RowSelection sel,
                                float inv_tau) {
  float local_max = -INFINITY;
  for (int j = team.rank(); j < n; j += team.size())
    if (is_selected(scores[j], valid[j], j, sel)) local_max = fmaxf(local_max, scores[j] * inv_tau);
  const float row_max = team.max(local_max);
  float local_sum = 0.0f;
  for (int j = team.rank(); j < n; j += team.size()) {
    const float e = is_selected(scores[j], valid[j], j, sel) ? expf(scores[j] * inv_tau - row_max) : 0.0f;
    scores[j] = e;
    local_sum += e;
  }
  const float total = team.sum(local_sum);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  for (int j = team.rank(); j < n; j += team.size()) scores[j] *= inv_total;
  team.sync();
  return total > 0.0f ? row_max + logf(total) : 0.0f;
}

// pooled[c] = sum_j weights[j] * patches[j][c] (fp32, patches in index order); returns ||pooled||.
template <class Team, class T>
MULCLIP_HD float weighted_sum(const Team& team, const float* weights, const T* patches, int n, int d,
                              float* pooled) {
  float local_sq = 0.0f;
  for (int c = team.rank(); c < d; c += team.size()) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j)
      if (weights[j] != 0.0f) acc += weights[j] * static_cast<float>(patches[static_cast<int64_t>(j) * d + c]);
    pooled[c] = acc;
    local_sq += acc * acc;
  }
  const float norm = sqrtf(team.sum(local_sq));
  return norm;
}

// The forward of one row: out = normalize(sum_{j in top-k} softmax_j(s_j / tau) x_j), zero for an
// invalid row. `scores` (n floats) and `pooled` (d floats) are the row's scratch.
template <class Team, class T>
MULCLIP_HD void topk_aggregate_row(const Team& team, const T* query, bool query_valid, const T* patches,
                                   const bool* patch_valid, int n, int d, int k, float inv_tau, float* scores,
                                   float* pooled, T* out) {
  row_scores(team, query, patches, n, d, scores);
  const RowSelection sel = select_topk(team, scores, patch_valid, n, k);
  softmax_weights(team, scores, patch_valid, n, sel, inv_tau);
  const float norm = weighted_sum(team, scores, patches, n, d, pooled);
  const float scale = query_valid ? 1.0f / fmaxf(norm, kNormalizeEps) : 0.0f;
  for (int c = team.rank(); c < d; c += team.size()) out[c] = static_cast<T>(pooled[c] * scale);
  team.sync();
}

// The first half of the backward, for one row (recomputing the forward from the inputs):
//   d_pooled = (g - u <u, g>) / max(||pooled||, eps)   with u the normalised aggregate, g = grad_out
//                                                       on a valid row (the radial term vanishes below eps)
//   dw_j = <d_pooled, x_j>,  ds_j = w_j (dw_j - sum_l w_l dw_l) / tau,  d_query = sum_j ds_j x_j.
// Writes the row's weights w (n), score gradients ds (n) and d_pooled (d), which the patch gradient
// (topk_aggregate_patch_grad) sums over the rows of a sample, and d_query.
template <class Team, class T>
MULCLIP_HD void topk_aggregate_row_backward(const Team& team, const T* grad_out, const T* query, bool query_valid,
                                            const T* patches, const bool* patch_valid, int n, int d, int k,
                                            float inv_tau, float* weights, float* d_scores, float* d_pooled,
                                            T* d_query) {
  row_scores(team, query, patches, n, d, weights);
  const RowSelection sel = select_topk(team, weights, patch_valid, n, k);
  softmax_weights(team, weights, patch_valid, n, sel, inv_tau);
  const float norm = weighted_sum(team, weights, patches, n, d, d_pooled);
  const float inv_norm = 1.0f / fmaxf(norm, kNormalizeEps);
  const float grad_scale = query_valid ? 1.0f : 0.0f;
  float local_radial = 0.0f;
  for (int c = team.rank(); c < d; c += team.size())
    local_radial += d_pooled[c] * inv_norm * static_cast<float>(grad_out[c]) * grad_scale;
  const float radial = norm > kNormalizeEps ? team.sum(local_radial) : 0.0f;  // norm is the same on every lane
  for (int c = team.rank(); c < d; c += team.size()) {
    const float u = d_pooled[c] * inv_norm;
    d_pooled[c] = (static_cast<float>(grad_out[c]) * grad_scale - u * radial) * inv_norm;
  }
  team.sync();
  float local_mix = 0.0f;
  for (int j = team.rank(); j < n; j += team.size()) {
    float dw = 0.0f;
    if (weights[j] != 0.0f) {
      const T* patch = patches + static_cast<int64_t>(j) * d;
      for (int c = 0; c < d; ++c) dw += d_pooled[c] * static_cast<float>(patch[c]);
    }
    d_scores[j] = dw;
    local_mix += weights[j] * dw;
  }
  const float mix = team.sum(local_mix);
  for (int j = team.rank(); j < n; j += team.size()) d_scores[j] = weights[j] * (d_scores[j] - mix) * inv_tau;
  team.sync();
  for (int c = team.rank(); c < d; c += team.size()) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j)
      if (d_scores[j] != 0.0f) acc += d_scores[j] * static_cast<float>(patches[static_cast<int64_t>(j) * d + c]);
    d_query[c] = static_cast<T>(acc);
  }
  team.sync();
}

// The second half of the backward, for one patch j of a sample: the sum over the sample's m rows, in row
// order (no atomics, so deterministic), d_patch[c] = sum_i w_ij d_pooled_i[c] + ds_ij query_i[c].
template <class Team, class T>
MULCLIP_HD void topk_aggregate_patch_grad(const Team& team, const float* weights, const float* d_scores,
                                          const float* d_pooled, const T* queries, int m, int n, int d, int j,
                                          T* d_patch) {
  for (int c = team.rank(); c < d; c += team.size()) {
    float acc = 0.0f;
    for (int i = 0; i < m; ++i) {
      const float w = weights[static_cast<int64_t>(i) * n + j];
      const float ds = d_scores[static_cast<int64_t>(i) * n + j];
      if (w != 0.0f) acc += w * d_pooled[static_cast<int64_t>(i) * d + c];
      if (ds != 0.0f) acc += ds * static_cast<float>(queries[static_cast<int64_t>(i) * d + c]);
    }
    d_patch[c] = static_cast<T>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------
// All pairs (pairwise_topk_aggregate_logits): one subcaption t against the patches x of one image.
// ---------------------------------------------------------------------------------------------------

// Bytes of one pair's bit-packed selection: bit j % 8 of byte j / 8 (the torch path's pack_bits).
MULCLIP_HD int selection_bytes(int n) { return (n + 7) / 8; }

MULCLIP_HD bool selection_bit(const uint8_t* bits, int j) { return (bits[j / 8] >> (j % 8)) & 1; }

// The logit <t, normalize(sum_{j in top-k} softmax_j(s_j / tau) x_j)> of one pair (0 for an invalid
// subcaption); writes the pair's packed selection and the log-sum-exp of its weights, which is all the
// backward keeps. `scores` (n) and `pooled` (d) are scratch.
template <class Team, class T>
MULCLIP_HD float pair_logit_forward(const Team& team, const T* query, bool query_valid, const T* patches,
                                    const bool* patch_valid, int n, int d, int k, float inv_tau, float* scores,
                                    float* pooled, uint8_t* selected, float* lse) {
  row_scores(team, query, patches, n, d, scores);
  const RowSelection sel = select_topk(team, scores, patch_valid, n, k);
  for (int byte = team.rank(); byte < selection_bytes(n); byte += team.size()) {
    uint8_t packed = 0;
    for (int bit = 0; bit < 8 && 8 * byte + bit < n; ++bit) {
      const int j = 8 * byte + bit;
      packed |= static_cast<uint8_t>(is_selected(scores[j], patch_valid[j], j, sel)) << bit;
    }
    selected[byte] = packed;
  }
  const float row_lse = softmax_weights(team, scores, patch_valid, n, sel, inv_tau);
  const float norm = weighted_sum(team, scores, patches, n, d, pooled);
  float local_dot = 0.0f;
  for (int c = team.rank(); c < d; c += team.size()) local_dot += static_cast<float>(query[c]) * pooled[c];
  const float logit = team.sum(local_dot) / fmaxf(norm, kNormalizeEps);
  if (team.rank() == 0) *lse = row_lse;
  return query_valid ? logit : 0.0f;
}

// The backward coefficients of one pair with upstream gradient g (0 for an invalid subcaption), from
// its saved selection and log-sum-exp. With w the weights, a = sum w_j x_j, nu = max(||a||, eps),
// u = a / nu, out = <t, u>, s_j = <t, x_j> and q_j = <u, x_j> (docs/method.md, "SAP"):
//   alpha_j = g (w_j / nu + w_j (s_j - out q_j) / (tau nu)),   beta_j = -g w_j out / nu,
//   dt = sum_j alpha_j x_j,   dx_j = alpha_j t + beta_j u.
// Writes alpha and beta (n each) and u (d); every one is 0 where w is (off the selection).
template <class Team, class T>
MULCLIP_HD void pair_logit_coefficients(const Team& team, const T* query, float g, const T* patches, int n, int d,
                                        float inv_tau, const uint8_t* selected, float lse, float* alpha, float* beta,
                                        float* u) {
  row_scores(team, query, patches, n, d, alpha);  // alpha holds the scores s until it is overwritten
  for (int j = team.rank(); j < n; j += team.size())
    beta[j] = selection_bit(selected, j) ? expf(alpha[j] * inv_tau - lse) : 0.0f;  // beta holds w for now
  team.sync();
  const float inv_nu = 1.0f / fmaxf(weighted_sum(team, beta, patches, n, d, u), kNormalizeEps);
  float local_out = 0.0f;
  for (int c = team.rank(); c < d; c += team.size()) {
    u[c] *= inv_nu;
    local_out += static_cast<float>(query[c]) * u[c];
  }
  const float out = team.sum(local_out);  // the reduction's barrier also publishes u
  for (int j = team.rank(); j < n; j += team.size()) {
    const float w = beta[j];
    float q = 0.0f;
    if (w != 0.0f) {
      const T* patch = patches + static_cast<int64_t>(j) * d;
      for (int c = 0; c < d; ++c) q += u[c] * static_cast<float>(patch[c]);
    }
    alpha[j] = g * (w * inv_nu + w * (alpha[j] - out * q) * inv_nu * inv_tau);
    beta[j] = -g * w * out * inv_nu;
  }
  team.sync();
}

// What the all-pairs backward reads: the inputs, the forward's packed selection and lse, and the upstream
// gradient [Bq, Bk, M]; pair (image, row) is row r = b*M + m of the subcaptions against image `image`.
template <class T>
struct PairwiseBackwardInputs {
  const T* grad;
  const T* sub;
  const T* patches;
  const bool* sub_mask;
  const uint8_t* selected;
  const float* lse;
  int64_t rows, keys;
  int m, n, d;
  float inv_tau;

  MULCLIP_HD const T* query(int64_t row) const { return sub + row * d; }
  MULCLIP_HD const T* image_patches(int64_t image) const { return patches + image * n * d; }
};

// The coefficients of pair (image, row) into alpha, beta and u (pair_logit_coefficients); false, with
// nothing written, when the pair's upstream gradient is 0 (an invalid subcaption, or no gradient), the
// same answer for every thread of the team.
template <class Team, class T>
MULCLIP_HD bool pair_backward_coefficients(const Team& team, const PairwiseBackwardInputs<T>& in, int64_t image,
                                           int64_t row, float* alpha, float* beta, float* u) {
  const int64_t logit = ((row / in.m) * in.keys + image) * in.m + row % in.m;
  const float g = in.sub_mask[row] ? static_cast<float>(in.grad[logit]) : 0.0f;
  if (g == 0.0f) return false;
  const int64_t pair = image * in.rows + row;
  pair_logit_coefficients(team, in.query(row), g, in.image_patches(image), in.n, in.d, in.inv_tau,
                          in.selected + pair * selection_bytes(in.n), in.lse[pair], alpha, beta, u);
  return true;
}

// d_query[c] += sum_j alpha_j x_j[c] for one pair (the subcaption's share of its gradient from one image).
template <class Team, class T>
MULCLIP_HD void add_query_grad(const Team& team, const float* alpha, const T* patches, int n, int d,
                               float* d_query) {
  for (int c = team.rank(); c < d; c += team.size()) {
    float acc = 0.0f;
    for (int j = 0; j < n; ++j)
      if (alpha[j] != 0.0f) acc += alpha[j] * static_cast<float>(patches[static_cast<int64_t>(j) * d + c]);
    d_query[c] += acc;
  }
}

// d_patches[j][c] += alpha_j t[c] + beta_j u[c] for one pair (the image's share of its gradient from one
// subcaption); the [n, d] accumulator belongs to the image.
template <class Team, class T>
MULCLIP_HD void add_patch_grad(const Team& team, const float* alpha, const float* beta, const T* query, const float* u,
                               int n, int d, float* d_patches) {
  for (int64_t e = team.rank(); e < static_cast<int64_t>(n) * d; e += team.size()) {
    const int j = static_cast<int>(e / d), c = static_cast<int>(e % d);
    if (alpha[j] != 0.0f || beta[j] != 0.0f) d_patches[e] += alpha[j] * static_cast<float>(query[c]) + beta[j] * u[c];
  }
}

// The gradient of one subcaption row over all images, summed in image order into acc (d floats), then
// written to d_query. alpha, beta (n) and u (d) are scratch.
template <class Team, class T>
MULCLIP_HD void pairwise_query_grad(const Team& team, const PairwiseBackwardInputs<T>& in, int64_t row, float* alpha,
                                    float* beta, float* u, float* acc, T* d_query) {
  for (int c = team.rank(); c < in.d; c += team.size()) acc[c] = 0.0f;
  for (int64_t image = 0; image < in.keys; ++image) {
    if (!pair_backward_coefficients(team, in, image, row, alpha, beta, u)) continue;
    add_query_grad(team, alpha, in.image_patches(image), in.n, in.d, acc);
    team.sync();  // alpha is rewritten by the next pair
  }
  for (int c = team.rank(); c < in.d; c += team.size()) d_query[c] = static_cast<T>(acc[c]);
}

// The gradient of one image's patches over all subcaption rows, summed in row order into acc (n * d
// floats), then written to d_patches. alpha, beta (n) and u (d) are scratch.
template <class Team, class T>
MULCLIP_HD void pairwise_patch_grad(const Team& team, const PairwiseBackwardInputs<T>& in, int64_t image,
                                    float* alpha, float* beta, float* u, float* acc, T* d_patches) {
  const int64_t size = static_cast<int64_t>(in.n) * in.d;
  for (int64_t e = team.rank(); e < size; e += team.size()) acc[e] = 0.0f;
  for (int64_t row = 0; row < in.rows; ++row) {
    if (!pair_backward_coefficients(team, in, image, row, alpha, beta, u)) continue;
    add_patch_grad(team, alpha, beta, in.query(row), u, in.n, in.d, acc);
    team.sync();  // alpha, beta and u are rewritten by the next pair
  }
  for (int64_t e = team.rank(); e < size; e += team.size()) d_patches[e] = static_cast<T>(acc[e]);
}

}  // namespace mulclip_fast
