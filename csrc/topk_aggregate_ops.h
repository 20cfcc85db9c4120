// What the CPU and CUDA registrations of the extension's ops share (with PyTorch: not for the .cu files).
#pragma once

#include <ATen/ATen.h>

namespace mulclip_fast {

struct TopkShape {
  int64_t batch;
  int m, n, d;
};

// Checks the inputs of topk_aggregate_forward/backward (one device, one dtype, bool masks of the token
// shapes, 1 <= k <= N, tau > 0) and returns their sizes.
TopkShape check_topk_inputs(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                            const at::Tensor& patch_mask, int64_t k, double tau);

struct PairwiseShape {
  int64_t queries, keys;
  int m, n, d;
};

// Checks the inputs of pairwise_topk_forward/backward (sub [Bq, M, d], patches [Bk, N, d], bool masks,
// one device and dtype, 1 <= k <= N, tau > 0) and returns their sizes.
PairwiseShape check_pairwise_inputs(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                                    const at::Tensor& patch_mask, int64_t k, double tau);

// The all-pairs forward's outputs: logits [Bq, Bk, M] in the input dtype, the packed selection uint8
// [Bk, Bq*M, ceil(N/8)] and its log-sum-exp fp32 [Bk, Bq*M] (the torch path's sap_forward layout).
struct PairwiseOutputs {
  at::Tensor logits, selected, lse;
};

PairwiseOutputs allocate_pairwise_outputs(const PairwiseShape& shape, const at::TensorOptions& like);

// The fp32 per-row results the backward's two passes share: weights and score gradients [B, M, N] and
// the gradient of the un-normalised aggregate [B, M, d] (never a [B, M, k, d] tensor).
struct BackwardWorkspace {
  at::Tensor weights, d_scores, d_pooled;
};

BackwardWorkspace allocate_backward_workspace(const TopkShape& shape, const at::TensorOptions& like);

}  // namespace mulclip_fast
