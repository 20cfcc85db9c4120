// Launchers of the CUDA kernels in topk_aggregate.cu: raw pointers, sizes and a stream, no PyTorch or
// CUDA types, so that nvcc compiles the kernels on their own and the registration (topk_aggregate_cuda_ops.cpp)
// calls them without CUDA headers. Each returns the CUDA error code of its launches (0 = success).
#pragma once

#include <stdint.h>

namespace mulclip_fast {

enum class ElementType { kFloat32, kFloat16, kBFloat16 };

// Threads per block of every kernel; each block handles one row (forward, backward) or one patch.
constexpr int kCudaBlockThreads = 256;
// Static shared memory of every kernel: the block reductions' per-warp float and int partials
// (MULCLIP_BLOCK_TEAM in topk_aggregate.cu). It counts against the same 48 KB as the dynamic part.
constexpr int64_t kStaticSharedBytes = (kCudaBlockThreads / 32) * (sizeof(float) + sizeof(int));

// Dynamic shared memory of the forward kernel: the row's n scores and d pooled channels, fp32.
inline int64_t topk_forward_shared_bytes(int n, int d) { return 4 * (static_cast<int64_t>(n) + d); }

// out[b, i] = the SAP aggregate of row i of sample b (topk_aggregate_row), batch * m rows.
int topk_aggregate_forward_cuda(ElementType type, const void* sub, const void* patches, const bool* sub_mask,
                                const bool* patch_mask, int64_t batch, int m, int n, int d, int k, float tau,
                                void* out, void* stream);

// d_sub and d_patches; weights, d_scores ([batch, m, n]) and d_pooled ([batch, m, d]) are fp32 workspace.
int topk_aggregate_backward_cuda(ElementType type, const void* grad_out, const void* sub, const void* patches,
                                 const bool* sub_mask, const bool* patch_mask, int64_t batch, int m, int n, int d,
                                 int k, float tau, float* weights, float* d_scores, float* d_pooled, void* d_sub,
                                 void* d_patches, void* stream);

// Dynamic shared memory of the all-pairs kernels: forward n scores + d channels; the backward's alpha,
// beta (n each), u and an accumulator (d each).
inline int64_t pairwise_forward_shared_bytes(int n, int d) { return 4 * (static_cast<int64_t>(n) + d); }
inline int64_t pairwise_backward_shared_bytes(int n, int d) { return 4 * (2 * static_cast<int64_t>(n) + 2 * d); }

// All pairs: logits [queries, keys, m], packed selection uint8 [keys, queries*m, ceil(n/8)], lse fp32
// [keys, queries*m]; one block per (image, subcaption) pair.
int pairwise_topk_forward_cuda(ElementType type, const void* sub, const void* patches, const bool* sub_mask,
                               const bool* patch_mask, int64_t queries, int64_t keys, int m, int n, int d, int k,
                               float tau, void* logits, uint8_t* selected, float* lse, void* stream);

// d_sub (one block per subcaption) and d_patches (one block per image, accumulating in the fp32 workspace
// patch_accumulator [keys, n, d]), from the forward's selection and lse.
int pairwise_topk_backward_cuda(ElementType type, const void* grad, const void* sub, const void* patches,
                                const bool* sub_mask, const uint8_t* selected, const float* lse, int64_t queries,
                                int64_t keys, int m, int n, int d, float tau, float* patch_accumulator, void* d_sub,
                                void* d_patches, void* stream);

}  // namespace mulclip_fast
