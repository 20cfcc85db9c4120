// The CPU twin of the CUDA extension: the per-row code of topk_aggregate.h run by a team of one thread,
// rows in parallel with at::parallel_for; and the registration of the extension's ops
// (docs/kernels.md, "The C++/CUDA extension").
//
// The Python ops (mulclip_fast.ops) validate shapes, masks, k and tau and hand over contiguous tensors;
// the TORCH_CHECKs here guard direct callers of torch.ops.mulclip_fast_ext.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "topk_aggregate.h"
#include "topk_aggregate_ops.h"

namespace mulclip_fast {
namespace {

// Runs f with a value of the C++ element type of `dtype` (fp32, fp16 or bf16: the dtypes the kernels take).
template <class F>
void with_element_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "mulclip_fast_ext takes float32, float16 or bfloat16 inputs, got ", dtype);
  }
}

at::Tensor topk_aggregate_forward_cpu(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                                      const at::Tensor& patch_mask, int64_t k, double tau) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  const at::Tensor q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  at::Tensor out = at::empty_like(q);
  with_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const bool* qm = q_mask.const_data_ptr<bool>();
    const bool* xm = x_mask.const_data_ptr<bool>();
    T* op = out.mutable_data_ptr<T>();
    const int n = shape.n, d = shape.d;
    at::parallel_for(0, shape.batch * shape.m, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(n), pooled(d);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / shape.m;
        topk_aggregate_row(SerialTeam{}, qp + row * d, qm[row], xp + b * n * d, xm + b * n, n, d, static_cast<int>(k),
                           static_cast<float>(1.0 / tau), scores.data(), pooled.data(), op + row * d);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_aggregate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& sub,
                                                               const at::Tensor& patches, const at::Tensor& sub_mask,
                                                               const at::Tensor& patch_mask, int64_t k, double tau) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  TORCH_CHECK(grad_out.sizes() == sub.sizes() && grad_out.scalar_type() == sub.scalar_type(),
              "grad_out must have the shape and dtype of sub");
  const at::Tensor g = grad_out.contiguous(), q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  const BackwardWorkspace ws = allocate_backward_workspace(shape, q.options());
  at::Tensor d_sub = at::empty_like(q), d_patches = at::empty_like(x);
  with_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* gp = g.const_data_ptr<T>();
    const T* qp = q.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const bool* qm = q_mask.const_data_ptr<bool>();
    const bool* xm = x_mask.const_data_ptr<bool>();
    float* weights = ws.weights.mutable_data_ptr<float>();
    float* d_scores = ws.d_scores.mutable_data_ptr<float>();
    float* d_pooled = ws.d_pooled.mutable_data_ptr<float>();
    T* dq = d_sub.mutable_data_ptr<T>();
    T* dx = d_patches.mutable_data_ptr<T>();
    const int m = shape.m, n = shape.n, d = shape.d;
    at::parallel_for(0, shape.batch * m, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / m;
        topk_aggregate_row_backward(SerialTeam{}, gp + row * d, qp + row * d, qm[row], xp + b * n * d, xm + b * n, n, d,
                                    static_cast<int>(k), static_cast<float>(1.0 / tau), weights + row * n,
                                    d_scores + row * n, d_pooled + row * d, dq + row * d);
      }
    });
    at::parallel_for(0, shape.batch * n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t patch = begin; patch < end; ++patch) {
        const int64_t b = patch / n;
        topk_aggregate_patch_grad(SerialTeam{}, weights + b * m * n, d_scores + b * m * n, d_pooled + b * m * d,
                                  qp + b * m * d, m, n, d, static_cast<int>(patch % n), dx + patch * d);
      }
    });
  });
  return {d_sub, d_patches};
}

// All pairs: logits [Bq, Bk, M], the packed selection uint8 [Bk, Bq*M, ceil(N/8)] and its log-sum-exp
// fp32 [Bk, Bq*M] (the layout of the torch path's sap_forward, whose backward contract they share).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise_topk_forward_cpu(const at::Tensor& sub,
                                                                         const at::Tensor& patches,
                                                                         const at::Tensor& sub_mask,
                                                                         const at::Tensor& patch_mask, int64_t k,
                                                                         double tau) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  const at::Tensor q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), x_mask = patch_mask.contiguous();
  const int64_t rows = shape.queries * shape.m;
  const int n = shape.n, d = shape.d, m = shape.m;
  const PairwiseOutputs outputs = allocate_pairwise_outputs(shape, q.options());
  const at::Tensor &logits = outputs.logits, &selected = outputs.selected, &lse = outputs.lse;
  with_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.const_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const bool* qm = q_mask.const_data_ptr<bool>();
    const bool* xm = x_mask.const_data_ptr<bool>();
    T* lp = logits.mutable_data_ptr<T>();
    uint8_t* sp = selected.mutable_data_ptr<uint8_t>();
    float* ep = lse.mutable_data_ptr<float>();
    at::parallel_for(0, shape.keys * rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(n), pooled(d);
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t image = pair / rows, row = pair % rows;
        const float logit = pair_logit_forward(SerialTeam{}, qp + row * d, qm[row], xp + image * n * d, xm + image * n,
                                               n, d, static_cast<int>(k), static_cast<float>(1.0 / tau),
                                               scores.data(), pooled.data(), sp + pair * selection_bytes(n), ep + pair);
        lp[((row / m) * shape.keys + image) * m + row % m] = static_cast<T>(logit);
      }
    });
  });
  return {logits, selected, lse};
}

// Gradients of the all-pairs logits from the saved selection and log-sum-exp: the subcaptions' in one
// pass over rows (each summing its images in order), the patches' in one pass over images (each summing
// its rows in order), both recomputing each pair's coefficients. No [Bq, Bk, M, N] tensor.
std::tuple<at::Tensor, at::Tensor> pairwise_topk_backward_cpu(const at::Tensor& grad, const at::Tensor& sub,
                                                              const at::Tensor& patches, const at::Tensor& sub_mask,
                                                              const at::Tensor& patch_mask,
                                                              const at::Tensor& selected, const at::Tensor& lse,
                                                              double tau) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, 1, tau);
  const int64_t rows = shape.queries * shape.m;
  const int n = shape.n, d = shape.d, m = shape.m;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({shape.queries, shape.keys, m}) &&
                  grad.scalar_type() == sub.scalar_type(),
              "grad must be [Bq, Bk, M] in the dtype of sub");
  TORCH_CHECK(selected.scalar_type() == at::kByte &&
                  selected.sizes() == at::IntArrayRef({shape.keys, rows, selection_bytes(n)}),
              "selected must be the forward's uint8 [Bk, Bq*M, ceil(N/8)]");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef({shape.keys, rows}),
              "lse must be the forward's float32 [Bk, Bq*M]");
  const at::Tensor gr = grad.contiguous(), q = sub.contiguous(), x = patches.contiguous();
  const at::Tensor q_mask = sub_mask.contiguous(), sel = selected.contiguous(), lse_c = lse.contiguous();
  at::Tensor d_sub = at::empty_like(q), d_patches = at::empty_like(x);
  with_element_type(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const PairwiseBackwardInputs<T> in{gr.const_data_ptr<T>(),
                                       q.const_data_ptr<T>(),
                                       x.const_data_ptr<T>(),
                                       q_mask.const_data_ptr<bool>(),
                                       sel.const_data_ptr<uint8_t>(),
                                       lse_c.const_data_ptr<float>(),
                                       rows,
                                       shape.keys,
                                       m,
                                       n,
                                       d,
                                       static_cast<float>(1.0 / tau)};
    T* dq = d_sub.mutable_data_ptr<T>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> alpha(n), beta(n), u(d), acc(d);
      for (int64_t row = begin; row < end; ++row) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t image = 0; image < shape.keys; ++image) {
          if (!pair_backward_coefficients(SerialTeam{}, in, image, row, alpha.data(), beta.data(), u.data())) continue;
          add_query_grad(SerialTeam{}, alpha.data(), in.image_patches(image), n, d, acc.data());
        }
        for (int c = 0; c < d; ++c) dq[row * d + c] = static_cast<T>(acc[c]);
      }
    });
    T* dx = d_patches.mutable_data_ptr<T>();
    at::parallel_for(0, shape.keys, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> alpha(n), beta(n), u(d), acc(static_cast<size_t>(n) * d);
      for (int64_t image = begin; image < end; ++image) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t row = 0; row < rows; ++row) {
          if (!pair_backward_coefficients(SerialTeam{}, in, image, row, alpha.data(), beta.data(), u.data())) continue;
          add_patch_grad(SerialTeam{}, alpha.data(), beta.data(), in.query(row), u.data(), n, d, acc.data());
        }
        for (int64_t e = 0; e < static_cast<int64_t>(n) * d; ++e) dx[image * n * d + e] = static_cast<T>(acc[e]);
      }
    });
  });
  return {d_sub, d_patches};
}

// The selection rule alone on explicit fp32 scores [R, N] (True = selected): lets tests feed it what no
// dot product produces here, such as -0.0 against +0.0.
at::Tensor topk_select_cpu(const at::Tensor& scores, const at::Tensor& valid, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.scalar_type() == at::kFloat, "scores must be a float32 [R, N] tensor");
  TORCH_CHECK(valid.scalar_type() == at::kBool && valid.sizes() == scores.sizes(),
              "valid must be a bool tensor shaped like scores");
  TORCH_CHECK(k >= 1 && k <= scores.size(1), "k must be in [1, N], got ", k);
  const at::Tensor s = scores.contiguous(), v = valid.contiguous();
  at::Tensor out = at::empty_like(v);
  const float* sp = s.const_data_ptr<float>();
  const bool* vp = v.const_data_ptr<bool>();
  bool* op = out.mutable_data_ptr<bool>();
  const int n = static_cast<int>(s.size(1));
  at::parallel_for(0, s.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const RowSelection sel = select_topk(SerialTeam{}, sp + row * n, vp + row * n, n, static_cast<int>(k));
      for (int j = 0; j < n; ++j) op[row * n + j] = is_selected(sp[row * n + j], vp[row * n + j], j, sel);
    }
  });
  return out;
}

}  // namespace

namespace {

// The checks both ops share: sub [*, M, d] and patches [*, N, d] of one dtype and width, bool masks of
// their token shapes, one device, 1 <= k <= N, tau > 0, sizes that the kernels' int indices hold.
void check_token_inputs(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                        const at::Tensor& patch_mask, int64_t k, double tau) {
  TORCH_CHECK(sub.dim() == 3 && patches.dim() == 3, "sub and patches must be [B, M, d] and [B', N, d]");
  TORCH_CHECK(sub.size(2) == patches.size(2), "sub and patches must share the width");
  TORCH_CHECK(sub.scalar_type() == patches.scalar_type(), "sub and patches must share a dtype");
  TORCH_CHECK(sub.device() == patches.device() && sub_mask.device() == sub.device() &&
                  patch_mask.device() == sub.device(),
              "all tensors must be on one device");
  TORCH_CHECK(sub_mask.scalar_type() == at::kBool && sub_mask.sizes() == sub.sizes().slice(0, 2),
              "sub_mask must be a bool [B, M] tensor");
  TORCH_CHECK(patch_mask.scalar_type() == at::kBool && patch_mask.sizes() == patches.sizes().slice(0, 2),
              "patch_mask must be a bool [B', N] tensor");
  TORCH_CHECK(k >= 1 && k <= patches.size(1), "k must be in [1, N], got ", k);
  TORCH_CHECK(tau > 0.0, "tau must be positive, got ", tau);
  constexpr int64_t int_max = 2147483647;
  TORCH_CHECK(sub.size(1) <= int_max && patches.size(1) <= int_max && sub.size(2) <= int_max,
              "M, N and d must fit in int32");
}

}  // namespace

TopkShape check_topk_inputs(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                            const at::Tensor& patch_mask, int64_t k, double tau) {
  check_token_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  TORCH_CHECK(sub.size(0) == patches.size(0), "sub and patches must share the batch (matched pairs)");
  return TopkShape{sub.size(0), static_cast<int>(sub.size(1)), static_cast<int>(patches.size(1)),
                   static_cast<int>(sub.size(2))};
}

PairwiseShape check_pairwise_inputs(const at::Tensor& sub, const at::Tensor& patches, const at::Tensor& sub_mask,
                                    const at::Tensor& patch_mask, int64_t k, double tau) {
  check_token_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  return PairwiseShape{sub.size(0), patches.size(0), static_cast<int>(sub.size(1)), static_cast<int>(patches.size(1)),
                       static_cast<int>(sub.size(2))};
}

PairwiseOutputs allocate_pairwise_outputs(const PairwiseShape& shape, const at::TensorOptions& like) {
  const int64_t rows = shape.queries * shape.m;
  return PairwiseOutputs{at::empty({shape.queries, shape.keys, shape.m}, like),
                         at::empty({shape.keys, rows, selection_bytes(shape.n)}, like.dtype(at::kByte)),
                         at::empty({shape.keys, rows}, like.dtype(at::kFloat))};
}

BackwardWorkspace allocate_backward_workspace(const TopkShape& shape, const at::TensorOptions& like) {
  const at::TensorOptions fp32 = like.dtype(at::kFloat);
  return BackwardWorkspace{at::empty({shape.batch, shape.m, shape.n}, fp32),
                           at::empty({shape.batch, shape.m, shape.n}, fp32),
                           at::empty({shape.batch, shape.m, shape.d}, fp32)};
}

}  // namespace mulclip_fast

TORCH_LIBRARY(mulclip_fast_ext, m) {
  m.def("topk_aggregate_forward(Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, int k, float tau) "
        "-> Tensor");
  m.def("topk_aggregate_backward(Tensor grad_out, Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, "
        "int k, float tau) -> (Tensor, Tensor)");
  m.def("pairwise_topk_forward(Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, int k, float tau) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("pairwise_topk_backward(Tensor grad, Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, "
        "Tensor selected, Tensor lse, float tau) -> (Tensor, Tensor)");
  m.def("topk_select(Tensor scores, Tensor valid, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(mulclip_fast_ext, CPU, m) {
  m.impl("topk_aggregate_forward", &mulclip_fast::topk_aggregate_forward_cpu);
  m.impl("topk_aggregate_backward", &mulclip_fast::topk_aggregate_backward_cpu);
  m.impl("pairwise_topk_forward", &mulclip_fast::pairwise_topk_forward_cpu);
  m.impl("pairwise_topk_backward", &mulclip_fast::pairwise_topk_backward_cpu);
  m.impl("topk_select", &mulclip_fast::topk_select_cpu);
}
