// The CPU twin of the CUDA extension: the per-row code of topk_aggregate.h run by a team of one thread
// (or, for tests, of several: ThreadTeam), rows in parallel with at::parallel_for; and the registration of the extension's ops
// (docs/kernels.md, "The C++/CUDA extension").
//
// The Python ops (mulclip_fast.ops) validate shapes, masks, k and tau and hand over contiguous tensors;
// the TORCH_CHECKs here guard direct callers of torch.ops.mulclip_fast_ext.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#include "topk_aggregate.h"
#include "topk_aggregate_ops.h"

namespace mulclip_fast {
namespace {

// std::barrier's arrive_and_wait in C++17: PyTorch before 2.12 builds extensions with -std=c++17, where
// <barrier> declares nothing (docs/notes/2026-12-01-version-floor.md). The mutex orders each lane's writes
// before the barrier against the other lanes' reads after it.
class LaneBarrier {
 public:
  explicit LaneBarrier(int lanes) : lanes_(lanes) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long phase = phase_;
    if (++arrived_ == lanes_) {
      arrived_ = 0;
      ++phase_;
      all_arrived_.notify_all();
      return;
    }
    all_arrived_.wait(lock, [&] { return phase_ != phase; });
  }

 private:
  const int lanes_;
  int arrived_ = 0;
  unsigned long phase_ = 0;
  std::mutex mutex_;
  std::condition_variable all_arrived_;
};

// Several std::threads sharing one row, as the threads of a CUDA block do: with lanes > 1 the ops run the
// shared code with the strided loops, barriers and reductions the kernels run, so a missing barrier or a
// result that depends on the lane shows on a CPU (tests/test_ops_extension.py). Reductions combine the
// lanes' partials in rank order, like the block's warps.
class ThreadTeam {
 public:
  struct Shared {
    explicit Shared(int lanes) : barrier(lanes), float_partials(lanes), int_partials(lanes) {}
    LaneBarrier barrier;
    std::vector<float> float_partials;
    std::vector<int> int_partials;
  };

  ThreadTeam(int rank, int size, Shared* shared) : rank_(rank), size_(size), shared_(shared) {}
  int rank() const { return rank_; }
  int size() const { return size_; }
  void sync() const { shared_->barrier.arrive_and_wait(); }
  float sum(float x) const {
    return reduce(x, shared_->float_partials, 0.0f, [](float a, float b) { return a + b; });
  }
  float max(float x) const {
    return reduce(x, shared_->float_partials, -INFINITY, [](float a, float b) { return fmaxf(a, b); });
  }
  int count(int x) const { return reduce(x, shared_->int_partials, 0, [](int a, int b) { return a + b; }); }

 private:
  template <class V, class Combine>
  V reduce(V x, std::vector<V>& partials, V init, Combine combine) const {
    partials[rank_] = x;
    sync();
    V total = init;
    for (const V partial : partials) total = combine(total, partial);
    sync();
    return total;
  }

  int rank_, size_;
  Shared* shared_;
};

// Runs f(team) once per lane of a team of `lanes` (one lane: the plain serial team, no threads).
template <class F>
void run_team(int64_t lanes, F&& f) {
  if (lanes == 1) {
    f(SerialTeam{});
    return;
  }
  ThreadTeam::Shared shared(static_cast<int>(lanes));
  std::vector<std::thread> threads;
  for (int rank = 0; rank < lanes; ++rank)
    threads.emplace_back([&, rank] { f(ThreadTeam(rank, static_cast<int>(lanes), &shared)); });
  for (std::thread& thread : threads) thread.join();
}

void check_lanes(int64_t lanes) { TORCH_CHECK(lanes >= 1 && lanes <= 256, "lanes must be in [1, 256], got ", lanes); }

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
                                      const at::Tensor& patch_mask, int64_t k, double tau, int64_t lanes) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  check_lanes(lanes);
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
        run_team(lanes, [&](const auto& team) {
          topk_aggregate_row(team, qp + row * d, qm[row], xp + b * n * d, xm + b * n, n, d, static_cast<int>(k),
                             static_cast<float>(1.0 / tau), scores.data(), pooled.data(), op + row * d);
        });
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> topk_aggregate_backward_cpu(const at::Tensor& grad_out, const at::Tensor& sub,
                                                               const at::Tensor& patches, const at::Tensor& sub_mask,
                                                               const at::Tensor& patch_mask, int64_t k, double tau,
                                                               int64_t lanes) {
  const TopkShape shape = check_topk_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  check_lanes(lanes);
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
        run_team(lanes, [&](const auto& team) {
          topk_aggregate_row_backward(team, gp + row * d, qp + row * d, qm[row], xp + b * n * d, xm + b * n, n, d,
                                      static_cast<int>(k), static_cast<float>(1.0 / tau), weights + row * n,
                                      d_scores + row * n, d_pooled + row * d, dq + row * d);
        });
      }
    });
    at::parallel_for(0, shape.batch * n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t patch = begin; patch < end; ++patch) {
        const int64_t b = patch / n;
        run_team(lanes, [&](const auto& team) {
          topk_aggregate_patch_grad(team, weights + b * m * n, d_scores + b * m * n, d_pooled + b * m * d,
                                    qp + b * m * d, m, n, d, static_cast<int>(patch % n), dx + patch * d);
        });
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
                                                                         double tau, int64_t lanes) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, k, tau);
  check_lanes(lanes);
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
        run_team(lanes, [&](const auto& team) {
          const float logit = pair_logit_forward(team, qp + row * d, qm[row], xp + image * n * d, xm + image * n, n,
                                                 d, static_cast<int>(k), static_cast<float>(1.0 / tau), scores.data(),
                                                 pooled.data(), sp + pair * selection_bytes(n), ep + pair);
          if (team.rank() == 0) lp[((row / m) * shape.keys + image) * m + row % m] = static_cast<T>(logit);
        });
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
                                                              double tau, int64_t lanes) {
  const PairwiseShape shape = check_pairwise_inputs(sub, patches, sub_mask, patch_mask, 1, tau);
  check_lanes(lanes);
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
        run_team(lanes, [&](const auto& team) {
          pairwise_query_grad(team, in, row, alpha.data(), beta.data(), u.data(), acc.data(), dq + row * d);
        });
      }
    });
    T* dx = d_patches.mutable_data_ptr<T>();
    at::parallel_for(0, shape.keys, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> alpha(n), beta(n), u(d), acc(static_cast<size_t>(n) * d);
      for (int64_t image = begin; image < end; ++image) {
        run_team(lanes, [&](const auto& team) {
          pairwise_patch_grad(team, in, image, alpha.data(), beta.data(), u.data(), acc.data(), dx + image * n * d);
        });
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
  // lanes: threads per row of the CPU twin (ThreadTeam), for tests of the team code; the CUDA kernels use
  // their block of kCudaBlockThreads whatever it says.
  m.def("topk_aggregate_forward(Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, int k, float tau, "
        "int lanes=1) -> Tensor");
  m.def("topk_aggregate_backward(Tensor grad_out, Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, "
        "int k, float tau, int lanes=1) -> (Tensor, Tensor)");
  m.def("pairwise_topk_forward(Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, int k, float tau, "
        "int lanes=1) -> (Tensor, Tensor, Tensor)");
  m.def("pairwise_topk_backward(Tensor grad, Tensor sub, Tensor patches, Tensor sub_mask, Tensor patch_mask, "
        "Tensor selected, Tensor lse, float tau, int lanes=1) -> (Tensor, Tensor)");
  m.def("topk_select(Tensor scores, Tensor valid, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(mulclip_fast_ext, CPU, m) {
  m.impl("topk_aggregate_forward", &mulclip_fast::topk_aggregate_forward_cpu);
  m.impl("topk_aggregate_backward", &mulclip_fast::topk_aggregate_backward_cpu);
  m.impl("pairwise_topk_forward", &mulclip_fast::pairwise_topk_forward_cpu);
  m.impl("pairwise_topk_backward", &mulclip_fast::pairwise_topk_backward_cpu);
  m.impl("topk_select", &mulclip_fast::topk_select_cpu);
}
