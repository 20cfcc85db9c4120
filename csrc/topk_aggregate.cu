// CUDA kernels of the SAP top-k aggregate (docs/kernels.md, "The C++/CUDA extension"): the per-row code
// of topk_aggregate.h run by a thread block, one block per row (forward, backward) or per patch (the
// patch gradient). Selection, softmax and reductions happen in shared memory, so any patch count whose
// n + d fp32 values fit a block's shared memory works (N = 1024 at d = 1024 takes 8 KB).
// Free of PyTorch headers: nvcc compiles this file on its own (python -m mulclip_fast.kernels.compile_check).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "topk_aggregate.h"
#include "topk_aggregate_cuda.h"

namespace mulclip_fast {
namespace {

constexpr int kWarps = kCudaBlockThreads / 32;

// The threads of one block sharing a row. Reductions go warp shuffle → one value per warp in shared
// memory → every thread sums the warps in the same order, so each thread gets the same, deterministic
// result; the trailing barrier lets the next reduction reuse the buffer.
struct BlockTeam {
  float* float_partials;  // kWarps floats of shared memory
  int* int_partials;      // kWarps ints of shared memory

  __device__ int rank() const { return threadIdx.x; }
  __device__ int size() const { return kCudaBlockThreads; }
  __device__ void sync() const { __syncthreads(); }

  __device__ float sum(float x) const { return reduce(x, float_partials, Add{}); }
  __device__ float max(float x) const { return reduce(x, float_partials, Max{}); }
  __device__ int count(int x) const { return reduce(x, int_partials, Add{}); }

 private:
  struct Add {
    template <class V>
    __device__ V operator()(V a, V b) const { return a + b; }
  };
  struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
  };

  template <class V, class Combine>
  __device__ V reduce(V x, V* partials, Combine combine) const {
    for (int offset = 16; offset > 0; offset >>= 1) x = combine(x, __shfl_xor_sync(0xffffffffu, x, offset));
    if (threadIdx.x % 32 == 0) partials[threadIdx.x / 32] = x;
    __syncthreads();
    V total = partials[0];
    for (int w = 1; w < kWarps; ++w) total = combine(total, partials[w]);
    __syncthreads();
    return total;
  }
};

#define MULCLIP_BLOCK_TEAM                     \
  __shared__ float float_partials[kWarps];   \
  __shared__ int int_partials[kWarps];       \
  const BlockTeam team{float_partials, int_partials}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads)
    topk_aggregate_forward_kernel(const T* sub, const T* patches, const bool* sub_mask, const bool* patch_mask, int m,
                                  int n, int d, int k, float inv_tau, T* out) {
  MULCLIP_BLOCK_TEAM;
  extern __shared__ float scratch[];  // n scores, then d pooled channels
  const int64_t row = blockIdx.x;
  const int64_t b = row / m;
  topk_aggregate_row(team, sub + row * d, sub_mask[row], patches + b * n * d, patch_mask + b * n, n, d, k, inv_tau,
                     scratch, scratch + n, out + row * d);
}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads)
    topk_aggregate_row_backward_kernel(const T* grad_out, const T* sub, const T* patches, const bool* sub_mask,
                                       const bool* patch_mask, int m, int n, int d, int k, float inv_tau,
                                       float* weights, float* d_scores, float* d_pooled, T* d_sub) {
  MULCLIP_BLOCK_TEAM;
  const int64_t row = blockIdx.x;
  const int64_t b = row / m;
  topk_aggregate_row_backward(team, grad_out + row * d, sub + row * d, sub_mask[row], patches + b * n * d,
                              patch_mask + b * n, n, d, k, inv_tau, weights + row * n, d_scores + row * n,
                              d_pooled + row * d, d_sub + row * d);
}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads)
    topk_aggregate_patch_grad_kernel(const float* weights, const float* d_scores, const float* d_pooled, const T* sub,
                                     int m, int n, int d, T* d_patches) {
  MULCLIP_BLOCK_TEAM;
  const int64_t patch = blockIdx.x;
  const int64_t b = patch / n;
  topk_aggregate_patch_grad(team, weights + b * m * n, d_scores + b * m * n, d_pooled + b * m * d, sub + b * m * d, m,
                            n, d, static_cast<int>(patch % n), d_patches + patch * d);
}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads)
    pairwise_topk_forward_kernel(const T* sub, const T* patches, const bool* sub_mask, const bool* patch_mask,
                                 int64_t rows, int64_t keys, int m, int n, int d, int k, float inv_tau, T* logits,
                                 uint8_t* selected, float* lse) {
  MULCLIP_BLOCK_TEAM;
  extern __shared__ float scratch[];  // n scores, then d pooled channels
  const int64_t pair = blockIdx.x;
  const int64_t image = pair / rows, row = pair % rows;
  const float logit = pair_logit_forward(team, sub + row * d, sub_mask[row], patches + image * n * d,
                                         patch_mask + image * n, n, d, k, inv_tau, scratch, scratch + n,
                                         selected + pair * selection_bytes(n), lse + pair);
  if (threadIdx.x == 0) logits[((row / m) * keys + image) * m + row % m] = static_cast<T>(logit);
}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads) pairwise_topk_query_grad_kernel(PairwiseBackwardInputs<T> in,
                                                                                    T* d_sub) {
  MULCLIP_BLOCK_TEAM;
  extern __shared__ float scratch[];  // alpha, beta (n each), u, accumulator (d each)
  const int n = in.n, d = in.d;
  float *alpha = scratch, *beta = scratch + n, *u = scratch + 2 * n, *acc = scratch + 2 * n + d;
  const int64_t row = blockIdx.x;
  pairwise_query_grad(team, in, row, alpha, beta, u, acc, d_sub + row * d);
}

template <class T>
__global__ void __launch_bounds__(kCudaBlockThreads)
    pairwise_topk_patch_grad_kernel(PairwiseBackwardInputs<T> in, float* patch_accumulator, T* d_patches) {
  MULCLIP_BLOCK_TEAM;
  extern __shared__ float scratch[];  // alpha, beta (n each), u (d)
  const int n = in.n, d = in.d;
  float *alpha = scratch, *beta = scratch + n, *u = scratch + 2 * n;
  const int64_t image = blockIdx.x;
  const int64_t size = static_cast<int64_t>(n) * d;
  pairwise_patch_grad(team, in, image, alpha, beta, u, patch_accumulator + image * size, d_patches + image * size);
}

template <class T>
int pairwise_forward(const void* sub, const void* patches, const bool* sub_mask, const bool* patch_mask,
                     int64_t queries, int64_t keys, int m, int n, int d, int k, float tau, void* logits,
                     uint8_t* selected, float* lse, cudaStream_t stream) {
  const int64_t rows = queries * m;
  if (rows * keys == 0) return cudaSuccess;
  pairwise_topk_forward_kernel<T><<<rows * keys, kCudaBlockThreads, pairwise_forward_shared_bytes(n, d), stream>>>(
      static_cast<const T*>(sub), static_cast<const T*>(patches), sub_mask, patch_mask, rows, keys, m, n, d, k,
      1.0f / tau, static_cast<T*>(logits), selected, lse);
  return cudaGetLastError();
}

template <class T>
int pairwise_backward(const void* grad, const void* sub, const void* patches, const bool* sub_mask,
                      const uint8_t* selected, const float* lse, int64_t queries, int64_t keys, int m, int n, int d,
                      float tau, float* patch_accumulator, void* d_sub, void* d_patches, cudaStream_t stream) {
  const int64_t rows = queries * m;
  const PairwiseBackwardInputs<T> in{static_cast<const T*>(grad), static_cast<const T*>(sub),
                                     static_cast<const T*>(patches), sub_mask, selected, lse, rows, keys, m, n, d,
                                     1.0f / tau};
  const auto shared = pairwise_backward_shared_bytes(n, d);
  if (rows > 0) {
    pairwise_topk_query_grad_kernel<T><<<rows, kCudaBlockThreads, shared, stream>>>(in, static_cast<T*>(d_sub));
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  if (keys > 0) {
    pairwise_topk_patch_grad_kernel<T><<<keys, kCudaBlockThreads, shared, stream>>>(in, patch_accumulator,
                                                                                     static_cast<T*>(d_patches));
  }
  return cudaGetLastError();
}

template <class T>
int forward(const void* sub, const void* patches, const bool* sub_mask, const bool* patch_mask, int64_t batch, int m,
            int n, int d, int k, float tau, void* out, cudaStream_t stream) {
  const int64_t rows = batch * m;
  if (rows == 0) return cudaSuccess;
  topk_aggregate_forward_kernel<T><<<rows, kCudaBlockThreads, topk_forward_shared_bytes(n, d), stream>>>(
      static_cast<const T*>(sub), static_cast<const T*>(patches), sub_mask, patch_mask, m, n, d, k, 1.0f / tau,
      static_cast<T*>(out));
  return cudaGetLastError();
}

template <class T>
int backward(const void* grad_out, const void* sub, const void* patches, const bool* sub_mask, const bool* patch_mask,
             int64_t batch, int m, int n, int d, int k, float tau, float* weights, float* d_scores, float* d_pooled,
             void* d_sub, void* d_patches, cudaStream_t stream) {
  if (batch * m > 0) {
    topk_aggregate_row_backward_kernel<T><<<batch * m, kCudaBlockThreads, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(sub), static_cast<const T*>(patches), sub_mask,
        patch_mask, m, n, d, k, 1.0f / tau, weights, d_scores, d_pooled, static_cast<T*>(d_sub));
    if (const cudaError_t error = cudaGetLastError(); error != cudaSuccess) return error;
  }
  if (batch * n > 0) {
    // m = 0 leaves the workspace unwritten, but the patch gradient then sums over no rows
    topk_aggregate_patch_grad_kernel<T><<<batch * n, kCudaBlockThreads, 0, stream>>>(
        weights, d_scores, d_pooled, static_cast<const T*>(sub), m, n, d, static_cast<T*>(d_patches));
  }
  return cudaGetLastError();
}

// Calls f with a value of the CUDA element type of `type`.
template <class F>
int with_element_type(ElementType type, F&& f) {
  switch (type) {
    case ElementType::kFloat32: return f(float{});
    case ElementType::kFloat16: return f(__half{});
    case ElementType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int pairwise_topk_forward_cuda(ElementType type, const void* sub, const void* patches, const bool* sub_mask,
                               const bool* patch_mask, int64_t queries, int64_t keys, int m, int n, int d, int k,
                               float tau, void* logits, uint8_t* selected, float* lse, void* stream) {
  return with_element_type(type, [&](auto tag) {
    return pairwise_forward<decltype(tag)>(sub, patches, sub_mask, patch_mask, queries, keys, m, n, d, k, tau, logits,
                                           selected, lse, static_cast<cudaStream_t>(stream));
  });
}

int pairwise_topk_backward_cuda(ElementType type, const void* grad, const void* sub, const void* patches,
                                const bool* sub_mask, const uint8_t* selected, const float* lse, int64_t queries,
                                int64_t keys, int m, int n, int d, float tau, float* patch_accumulator, void* d_sub,
                                void* d_patches, void* stream) {
  return with_element_type(type, [&](auto tag) {
    return pairwise_backward<decltype(tag)>(grad, sub, patches, sub_mask, selected, lse, queries, keys, m, n, d, tau,
                                            patch_accumulator, d_sub, d_patches, static_cast<cudaStream_t>(stream));
  });
}

int topk_aggregate_forward_cuda(ElementType type, const void* sub, const void* patches, const bool* sub_mask,
                                const bool* patch_mask, int64_t batch, int m, int n, int d, int k, float tau,
                                void* out, void* stream) {
  return with_element_type(type, [&](auto tag) {
    return forward<decltype(tag)>(sub, patches, sub_mask, patch_mask, batch, m, n, d, k, tau, out,
                                  static_cast<cudaStream_t>(stream));
  });
}

int topk_aggregate_backward_cuda(ElementType type, const void* grad_out, const void* sub, const void* patches,
                                 const bool* sub_mask, const bool* patch_mask, int64_t batch, int m, int n, int d,
                                 int k, float tau, float* weights, float* d_scores, float* d_pooled, void* d_sub,
                                 void* d_patches, void* stream) {
  return with_element_type(type, [&](auto tag) {
    return backward<decltype(tag)>(grad_out, sub, patches, sub_mask, patch_mask, batch, m, n, d, k, tau, weights,
                                   d_scores, d_pooled, d_sub, d_patches, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace mulclip_fast
