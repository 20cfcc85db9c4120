// The CUDA registration of the extension's ops: checks, workspace and the current stream of the inputs'
// device, then the PyTorch-free launchers of topk_aggregate.cu. Built only where PyTorch has CUDA and
// nvcc is found (mulclip_fast/ops/extension.py); the ops themselves are defined in topk_aggregate_cpu.cpp.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "topk_aggregate.h"
#include "topk_aggregate_cuda.h"
#include "topk_aggregate_ops.h"

namespace mulclip_fast {
namespace {

ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    default: TORCH_CHECK(false, "mulclip_fast_ext takes float32, float16 or bfloat16 inputs, got ", dtype);
  }
}

// Shared memory beyond the 48 KB a launch gets without opting in (static and dynamic together) is refused
// up front, with this message rather than the launch's bare CUDA error.
template <class Shape>
void check_shared_memory(int64_t dynamic_bytes, const Shape& shape) {
  const int64_t bytes = dynamic_bytes + kStaticSharedBytes;
  TORCH_CHECK(bytes <= 48 * 1024, "the CUDA top-k kernels hold a row of N scores and d channels in 48 KB of shared ",
              "memory; N = ", shape.n, ", d = ", shape.d, " need ", bytes, " bytes");
}

void check_launch(int error, const char* what) {
  TORCH_CHECK(error == 0, what, " failed with CUDA error ", error);
}

at::Tensor topk_aggregate_forward_cuda_op(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                                          const at::Tensor& patch_mask, int64_t k, double tau,
                                          int64_t /*lanes: the CPU twin's; a block has kCudaBlockThreads*/) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  check_shared_memory(topk_forward_shared_bytes(shape.n, shape.d), shape);
  const c10::cuda::CUDAGuard guard(sub.device());
  const at::Tensor q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  at::Tensor out = at::empty_like(q);
  check_launch(topk_aggregate_forward_cuda(element_type(q.scalar_type()), q.const_data_ptr(), x.const_data_ptr(),
                                           q_mask.const_data_ptr<bool>(), x_mask.const_data_ptr<bool>(), shape.batch,
                                           shape.m, shape.n, shape.d, static_cast<int>(k), static_cast<float>(tau),
                                           out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "topk_aggregate_forward");
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_aggregate_backward_cuda_op(const at::Tensor& grad_out, const at::Tensor& sub,
                                                                   const at::Tensor& patches,
                                                                   const at::Tensor& sub_mask,
                                                                   const at::Tensor& patch_mask, int64_t k,
                                                                   double tau, int64_t /*lanes: the CPU twin's*/) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  TORCH_CHECK(grad_out.sizes() == sub.sizes() && grad_out.scalar_type() == sub.scalar_type() &&
                  grad_out.device() == sub.device(),
              "grad_out must have the shape, dtype and device of sub");
  const c10::cuda::CUDAGuard guard(sub.device());
  const at::Tensor g = grad_out.contiguous(), q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  const BackwardWorkspace ws = allocate_backward_workspace(shape, q.options());
  at::Tensor d_sub = at::empty_like(q), d_patches = at::empty_like(x);
  check_launch(topk_aggregate_backward_cuda(
                   element_type(q.scalar_type()), g.const_data_ptr(), q.const_data_ptr(), x.const_data_ptr(),
                   q_mask.const_data_ptr<bool>(), x_mask.const_data_ptr<bool>(), shape.batch, shape.m, shape.n,
                   shape.d, static_cast<int>(k), static_cast<float>(tau), ws.weights.mutable_data_ptr<float>(),
                   ws.d_scores.mutable_data_ptr<float>(), ws.d_pooled.mutable_data_ptr<float>(),
                   d_sub.mutable_data_ptr(), d_patches.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "topk_aggregate_backward");
  return {d_sub, d_patches};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_topk_forward_cuda_op(const at::Tensor& sub,
                                                                             const at::Tensor& patches,
                                                                             const at::Tensor& sub_mask,
                                                                             const at::Tensor& patch_mask, int64_t k,
                                                                             double tau,
                                                                             int64_t /*lanes: the CPU twin's*/) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  check_shared_memory(pairwise_backward_shared_bytes(shape.n, shape.d), shape);
  const c10::cuda::CUDAGuard guard(sub.device());
  const at::Tensor q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  const PairwiseOutputs outputs = allocate_pairwise_outputs(shape, q.options());
  const at::Tensor &logits = outputs.logits, &selected = outputs.selected, &lse = outputs.lse;
  check_launch(pairwise_topk_forward_cuda(element_type(q.scalar_type()), q.const_data_ptr(), x.const_data_ptr(),
                                          q_mask.const_data_ptr<bool>(), x_mask.const_data_ptr<bool>(), shape.queries,
                                          shape.keys, shape.m, shape.n, shape.d, static_cast<int>(k),
                                          static_cast<float>(tau), logits.mutable_data_ptr(),
                                          selected.mutable_data_ptr<uint8_t>(), lse.mutable_data_ptr<float>(),
                                          c10::cuda::getCurrentCUDAStream().stream()),
               "pairwise_topk_forward");
  return {logits, selected, lse};
}

std::tuple<at::Tensor, at::Tensor> pairwise_topk_backward_cuda_op(const at::Tensor& grad, const at::Tensor& sub,
                                                                  const at::Tensor& patches,
                                                                  const at::Tensor& sub_mask,
                                                                  const at::Tensor& patch_mask,
                                                                  const at::Tensor& selected, const at::Tensor& lse,
                                                                  double tau, int64_t /*lanes: the CPU twin's*/) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, 1, tau);
  const int64_t rows = shape.queries * shape.m;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({shape.queries, shape.keys, shape.m}) &&
                  grad.scalar_type() == sub.scalar_type() && grad.device() == sub.device(),
              "grad must be [Bq, Bk, M] in the dtype and on the device of sub");
  TORCH_CHECK(selected.scalar_type() == at::kByte &&
                  selected.sizes() == at::IntArrayRef({shape.keys, rows, selection_bytes(shape.n)}) &&
                  lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({shape.keys, rows}) &&
                  selected.device() == sub.device() && lse.device() == sub.device(),
              "selected and lse must be the forward's uint8 [Bk, Bq*M, ceil(N/8)] and float32 [Bk, Bq*M], on the "
              "device of sub");
  const c10::cuda::CUDAGuard guard(sub.device());
  const at::Tensor g = grad.contiguous(), q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), sel = selected.contiguous(), lse_c = lse.contiguous();
  at::Tensor accumulator = at::empty({shape.keys, shape.n, shape.d}, q.options().dtype(at::kFloat));
  at::Tensor d_sub = at::empty_like(q), d_patches = at::empty_like(x);
  check_launch(pairwise_topk_backward_cuda(element_type(q.scalar_type()), g.const_data_ptr(), q.const_data_ptr(),
                                           x.const_data_ptr(), q_mask.const_data_ptr<bool>(),
                                           sel.const_data_ptr<uint8_t>(), lse_c.const_data_ptr<float>(),
                                           shape.queries, shape.keys, shape.m, shape.n, shape.d,
                                           static_cast<float>(tau), accumulator.mutable_data_ptr<float>(),
                                           d_sub.mutable_data_ptr(), d_patches.mutable_data_ptr(),
                                           c10::cuda::getCurrentCUDAStream().stream()),
               "pairwise_topk_backward");
  return {d_sub, d_patches};
}

}  // namespace
}  // namespace mulclip_fast

TORCH_LIBRARY_IMPL(mulclip_fast_ext, CUDA, m) {
  m.impl("topk_aggregate_forward", &mulclip_fast::topk_aggregate_forward_cuda_op);
  m.impl("topk_aggregate_backward", &mulclip_fast::topk_aggregate_backward_cuda_op);
  m.impl("pairwise_topk_forward", &mulclip_fast::pairwise_topk_forward_cuda_op);
  m.impl("pairwise_topk_backward", &mulclip_fast::pairwise_topk_backward_cuda_op);
}
