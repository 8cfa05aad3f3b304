// Argument checks and the GEMMs around the step loop, shared by every backend.

// Per-operator ATen headers only: the Tensor class with its methods, plus the header of
// each at:: function called here. Including <ATen/ATen.h> or <ATen/Functions.h> (every
// operator, several seconds of parsing per file) is then a compile error.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif

#include "gru.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>  // bias_ih + bias_hh, a < b
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Storage.h>
#include <c10/util/accumulate.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gru_math.h"

namespace gru_fused {
namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream ss;
  ss << t.sizes();
  return ss.str();
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "gru_fused: ", name, " must be a floating point tensor (float32, float64, "
              "float16 or bfloat16), got ", st);
}

void check_like(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "gru_fused: ", name,
              " has dtype ", t.scalar_type(), " but input has dtype ", input.scalar_type(),
              "; all tensors must have one dtype");
  TORCH_CHECK(t.device() == input.device(), "gru_fused: ", name, " is on ", t.device(),
              " but input is on ", input.device(), "; all tensors must be on one device");
}

void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name,
                 const char* what) {
  TORCH_CHECK(t.sizes() == expected, "gru_fused: ", name, " must have shape ", expected,
              " ", what, ", got ", shape_str(t));
}

// lengths [B] as the step loops read it: int64, on the CPU, values in [0, T], and
// contiguous (a strided or expanded tensor is copied: the loops index it as b).
struct CheckedLengths {
  at::Tensor values;    // [B] int64, contiguous, CPU; undefined without lengths
  bool padded = false;  // some sequence is shorter than T
};

// The lengths the loops read, on input's device: undefined when no sequence is padded
// (then lengths change nothing). A GPU backend's hook makes the copy without a host
// synchronisation (a plain .to(device) would block on the stream every call, and is
// illegal during CUDA graph capture).
at::Tensor lengths_for_loops(const CheckedLengths& len, const at::Tensor& input,
                             const BackendExtras& extras) {
  if (!len.padded) return at::Tensor();
  if (extras.lengths_to_device != nullptr) {
    return extras.lengths_to_device(len.values, input.device());
  }
  TORCH_INTERNAL_ASSERT(input.is_cpu(), "gru_fused: a backend on ", input.device(),
                        " must set BackendExtras::lengths_to_device");
  return len.values;
}

CheckedLengths checked_lengths(const std::optional<at::Tensor>& lengths, int64_t T,
                               int64_t B) {
  if (!lengths.has_value()) return {};
  const at::Tensor& len = *lengths;
  TORCH_CHECK(len.scalar_type() == at::kLong && len.dim() == 1 && len.size(0) == B,
              "gru_fused: lengths must be a 1-D int64 tensor of size B = ", B, ", got ",
              len.scalar_type(), " of shape ", shape_str(len));
  TORCH_CHECK(len.device().is_cpu(), "gru_fused: lengths must be a CPU tensor (as "
              "torch.nn.utils.rnn requires), got one on ", len.device());
  int64_t lo = T;
  if (B > 0) {
    lo = len.min().item<int64_t>();
    const int64_t hi = len.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi <= T, "gru_fused: lengths must lie in [0, T] = [0, ", T,
                "], got values in [", lo, ", ", hi, "]");
  }
  return {len.contiguous(), lo < T};
}

// Checks the forward's arguments; returns H.
int64_t check_forward_args(const at::Tensor& input, const at::Tensor& hx,
                           const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                           const std::optional<at::Tensor>& bias_ih,
                           const std::optional<at::Tensor>& bias_hh) {
  check_floating(input, "input");
  TORCH_CHECK(input.dim() == 3, "gru_fused: input must be a 3-D tensor [T, B, I], got a ",
              input.dim(), "-D tensor of shape ", shape_str(input));
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  TORCH_CHECK(T > 0, "gru_fused: input must have at least one step, got shape ",
              shape_str(input));
  TORCH_CHECK(weight_hh.dim() == 2, "gru_fused: weight_hh must be a 2-D tensor [3H, H], "
              "got shape ", shape_str(weight_hh));
  const int64_t H = weight_hh.size(1);
  TORCH_CHECK(H > 0, "gru_fused: weight_hh must have at least one hidden unit");
  check_shape(weight_hh, {3 * H, H}, "weight_hh", "[3H, H] (gates r, z, n stacked)");
  check_shape(weight_ih, {3 * H, I}, "weight_ih", "[3H, I] (I = input.size(2))");
  check_shape(hx, {B, H}, "hx", "[B, H] (B = input.size(1), H = weight_hh.size(1))");
  check_like(hx, input, "hx");
  check_like(weight_ih, input, "weight_ih");
  check_like(weight_hh, input, "weight_hh");
  TORCH_CHECK(bias_ih.has_value() == bias_hh.has_value(),
              "gru_fused: bias_ih and bias_hh must be given together or both omitted");
  if (bias_ih.has_value()) {
    check_shape(*bias_ih, {3 * H}, "bias_ih", "[3H]");
    check_shape(*bias_hh, {3 * H}, "bias_hh", "[3H]");
    check_like(*bias_ih, input, "bias_ih");
    check_like(*bias_hh, input, "bias_hh");
  }
  return H;
}

// Buffers that live only while one op runs: gi in the forward, dG, dGh and h_prev in
// the backward. CUDA's caching allocator recycles them anyway. On the CPU, glibc hands a
// freed multi-megabyte buffer back to the OS and the next call page-faults it in again,
// 4 KB at a time: at the time machine shape that was a quarter of the forward's time.
// So each CPU thread keeps its buffer per role for the next call, up to kMaxCached bytes.
enum ScratchRole : int {
  kScratchGi = 0, kScratchDG = 1, kScratchDGh = 2, kScratchHPrev = 3, kNumScratch = 4
};

constexpr int64_t kMaxCached = int64_t(32) << 20;

// at::empty for a buffer the op fills. From 32 MB up, glibc maps a fresh CPU buffer from
// the OS every time, and filling it takes a page fault per 4 KB: 0.2 s for 400 MB on a
// VM, more than many a GEMM. On Linux, ask for transparent huge pages before the first
// touch (the kernel may decline): 512 times fewer faults.
at::Tensor empty_to_fill(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * int64_t(t.element_size());
  if (t.is_cpu() && bytes >= kMaxCached) {
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + uintptr_t(bytes)) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

// The saved workspace (4 T B H values), the op's biggest buffer, comes from a small pool
// on the CPU. In a training loop one workspace is freed (its backward done) just before
// the next forward asks for one; from 32 MB up glibc would unmap it, and the next
// forward would page-fault it back in, zeroed by the kernel: a few percent of a big
// layer's time. The pool keeps the last kMaxFree freed blocks of 32 MB or more and
// serves a request from one at most twice its size; a newly freed block pushes out the
// oldest, so what the pool holds follows the shapes in use.
class WorkspacePool {
 public:
  static WorkspacePool& instance() {
    static auto* pool = new WorkspacePool();  // never destroyed: tensors may outlive statics
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
    if (!options.device().is_cpu() || bytes < kMaxCached) return empty_to_fill(sizes, options);
    Block block = take(bytes);
    if (block.owner == nullptr) {
      at::Tensor fresh = empty_to_fill({bytes}, at::TensorOptions(at::kByte));
      block = {new at::Storage(fresh.storage()), bytes};
    }
    return at::from_blob(block.owner->mutable_data(), sizes,
                         [this, block](void*) { release(block); }, options);
  }

 private:
  struct Block {
    at::Storage* owner = nullptr;  // holds the memory while the block is in use or free
    int64_t bytes = 0;
  };
  static constexpr size_t kMaxFree = 2;

  Block take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes <= 2 * bytes) {
        const Block block = *it;
        free_.erase(it);
        return block;
      }
    }
    return {};
  }

  void release(const Block& block) {
    Block evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.push_back(block);
      if (free_.size() <= kMaxFree) return;
      evicted = free_.front();
      free_.erase(free_.begin());
    }
    delete evicted.owner;
  }

  std::mutex mu_;
  std::vector<Block> free_;  // oldest first

 public:
  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t total = 0;
    for (const Block& block : free_) total += block.bytes;
    return total;
  }

  int64_t clear() {
    std::vector<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mu_);
      dropped.swap(free_);
    }
    int64_t total = 0;
    for (const Block& block : dropped) {
      total += block.bytes;
      delete block.owner;
    }
    return total;
  }
};

// Every thread's scratch buffers, one per role, registered so that empty_cache() can
// drop them from any thread. A buffer is a Storage: one handed out by scratch() stays
// alive, through its tensor, until that tensor dies, whatever happens to the cache.
class ScratchCaches {
 public:
  using Cache = std::array<at::Storage, kNumScratch>;

  static ScratchCaches& instance() {
    static auto* caches = new ScratchCaches();  // never destroyed: threads may outlive statics
    return *caches;
  }

  // A buffer of at least `bytes` for role, this thread's if it is big enough.
  at::Storage get(ScratchRole role, int64_t bytes) {
    thread_local Registered mine;
    std::lock_guard<std::mutex> lock(mu_);
    at::Storage& storage = (*mine.cache)[role];
    if (!storage || static_cast<int64_t>(storage.nbytes()) < bytes) {
      storage = at::empty({bytes}, at::TensorOptions(at::kByte)).storage();
    }
    return storage;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t total = 0;
    for (const auto& cache : caches_) {
      for (const at::Storage& storage : *cache) total += storage ? int64_t(storage.nbytes()) : 0;
    }
    return total;
  }

  int64_t clear() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t total = 0;
    for (const auto& cache : caches_) {
      for (at::Storage& storage : *cache) {
        total += storage ? int64_t(storage.nbytes()) : 0;
        storage = at::Storage();
      }
    }
    return total;
  }

 private:
  // A thread's cache, listed here from its first use to the thread's exit.
  struct Registered {
    std::shared_ptr<Cache> cache = std::make_shared<Cache>();
    Registered() {
      auto& self = instance();
      std::lock_guard<std::mutex> lock(self.mu_);
      self.caches_.push_back(cache);
    }
    ~Registered() {
      auto& self = instance();
      std::lock_guard<std::mutex> lock(self.mu_);
      self.caches_.erase(std::find(self.caches_.begin(), self.caches_.end(), cache));
    }
  };

  std::mutex mu_;
  std::vector<std::shared_ptr<Cache>> caches_;
};

at::Tensor scratch(ScratchRole role, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (!options.device().is_cpu() || bytes > kMaxCached) return empty_to_fill(sizes, options);
  return at::empty({0}, options).set_(ScratchCaches::instance().get(role, bytes), 0, sizes);
}

// Steps per call of a loop whose per-step buffer takes step_bytes: all T, unless the
// backend takes chunks and the buffer would outgrow the scratch cache; then as many as
// fit (at least one).
int64_t steps_per_chunk(const BackendExtras& extras, int64_t T, int64_t step_bytes) {
  if (!extras.step_chunks || step_bytes == 0 || T * step_bytes <= kMaxCached) return T;
  return std::max<int64_t>(1, kMaxCached / step_bytes);
}

// Products with h_prev, the state each step starts from: hx at the first step processed,
// the output of the step before at the others. mm() gives dst (+)= src^T h_prev over the
// steps [t0, t0 + n), src [n * B, M]. Over one chunk of all steps that fits the scratch
// cache, h_prev is copied into one buffer for single GEMMs; otherwise hx's rows and the
// output's are two GEMMs (the output's rows are a contiguous range of it).
class HPrev {
 public:
  HPrev(const at::Tensor& hx, const at::Tensor& output, bool reverse, bool one_chunk)
      : hx_(hx), output_(output), reverse_(reverse) {
    const int64_t T = output.size(0), B = output.size(1), H = output.size(2);
    if (!one_chunk || T * B * H * int64_t(output.element_size()) > kMaxCached) return;
    at::Tensor h_prev = scratch(kScratchHPrev, {T, B, H}, output.options());
    h_prev[reverse ? T - 1 : 0].copy_(hx);
    if (T > 1) {
      h_prev.narrow(0, reverse ? 0 : 1, T - 1).copy_(output.narrow(0, reverse ? 1 : 0, T - 1));
    }
    whole_ = h_prev.view({T * B, H});
  }

  void mm(at::Tensor dst, const at::Tensor& src, int64_t t0, int64_t n, bool accumulate) const {
    const int64_t T = output_.size(0), B = output_.size(1), H = output_.size(2);
    const auto product = [&](const at::Tensor& a, const at::Tensor& b) {
      if (accumulate) {
        dst.addmm_(a.t(), b);
      } else {
        at::mm_out(dst, a.t(), b);
      }
    };
    if (whole_.defined()) {
      product(src, whole_);
      return;
    }
    const int64_t first = reverse_ ? T - 1 : 0;  // the step that starts from hx
    const bool has_first = t0 <= first && first < t0 + n;
    // The output rows: step t starts from output[t - 1] (output[t + 1] when reverse).
    const int64_t rows_t0 = has_first && !reverse_ ? t0 + 1 : t0;
    const int64_t rows_n = has_first ? n - 1 : n;
    if (rows_n > 0) {
      product(src.narrow(0, (rows_t0 - t0) * B, rows_n * B),
              output_.view({T * B, H}).narrow(0, (rows_t0 + (reverse_ ? 1 : -1)) * B, rows_n * B));
    }
    if (has_first) {
      const at::Tensor src_first = src.narrow(0, (first - t0) * B, B);
      if (rows_n > 0 || accumulate) {
        dst.addmm_(src_first.t(), hx_);
      } else {
        at::mm_out(dst, src_first.t(), hx_);
      }
    }
  }

 private:
  at::Tensor hx_, output_, whole_;
  bool reverse_;
};

}  // namespace

int64_t cached_bytes() {
  return ScratchCaches::instance().cached_bytes() + WorkspacePool::instance().cached_bytes();
}

int64_t empty_cache() {
  return ScratchCaches::instance().clear() + WorkspacePool::instance().clear();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_impl(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse, ForwardLoop loop, const BackendExtras& extras,
    bool keep_workspace) {
  // Kernels sit below autograd: the GEMMs here must not record a graph of their own.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_forward_args(input, hx, weight_ih, weight_hh, bias_ih, bias_hh);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const CheckedLengths len = checked_lengths(lengths, T, B);

  ForwardLoopArgs a;
  a.reset_after = reset_after;
  a.reverse = reverse;
  a.hx = hx.contiguous();
  a.weight_hh = weight_hh.contiguous();
  auto x2d = input.reshape({T * B, I});
  // Fold every bias that sits outside the reset gate into the input projection:
  // b_hr, b_hz always; b_hn only when the reset is applied before the matmul.
  at::Tensor folded;
  if (bias_ih.has_value()) {
    folded = *bias_ih + *bias_hh;
    if (reset_after) {
      folded.narrow(0, kGateN * H, H).copy_(bias_ih->narrow(0, kGateN * H, H));
      a.b_hn = bias_hh->narrow(0, kGateN * H, H).contiguous();
    }
  }
  const at::Tensor cols = extras.one_hot ? extras.one_hot->columns(input) : at::Tensor();
  // Row (t, b) of x W_ih^T + folded is row cols[t, b] of the table W_ih^T + folded: the
  // GEMM's sum is that one product plus exact zeros, so the table gives the same bits,
  // provided W_ih is finite (0 * inf = NaN). A finite sum proves that in one cheap
  // reduction; one that overflows merely sends us to the GEMM.
  const bool table = cols.defined() && std::isfinite(weight_ih.sum().item<double>());
  if (table) {
    // [I, 3H], read row by row through gi_rows. A fresh tensor when the biases are
    // folded in: weight_ih.t().contiguous() is weight_ih itself when that is already a
    // transposed [I, 3H] (or I == 1), and an op never writes into its arguments.
    if (folded.defined()) {
      a.gi = at::empty({I, 3 * H}, input.options());
      at::add_out(a.gi, weight_ih.t(), folded);
    } else {
      a.gi = weight_ih.t().contiguous();  // only read
    }
    a.gi_rows = cols.view({T, B});
  }
  a.lengths = lengths_for_loops(len, input, extras);
  a.output = empty_to_fill({T, B, H}, input.options());
  a.workspace = WorkspacePool::instance().empty({kNumSlots, keep_workspace ? T : 1, B, H},
                                                input.options());

  const int64_t chunk =
      table ? T : steps_per_chunk(extras, T, B * 3 * H * int64_t(input.element_size()));
  for (int64_t i0 = 0; i0 < T; i0 += chunk) {
    const int64_t i1 = std::min(T, i0 + chunk), n = i1 - i0;
    const int64_t t0 = reverse ? T - i1 : i0;  // the chunk's steps are [t0, t0 + n)
    if (!table) {
      a.gi = scratch(kScratchGi, {n, B, 3 * H}, input.options());
      auto gi2d = a.gi.view({n * B, 3 * H});
      auto x_rows = x2d.narrow(0, t0 * B, n * B);
      if (folded.defined()) {
        at::addmm_out(gi2d, folded, x_rows, weight_ih.t());
      } else {
        at::mm_out(gi2d, x_rows, weight_ih.t());
      }
    }
    a.iter_begin = i0;
    a.iter_end = i1;
    a.step0 = t0;
    if (B > 0) loop(a);  // an empty batch has nothing to step (as nn.GRU allows)
  }
  // The state after the last step processed; with lengths, the carried state is each
  // sequence's state after its own last step. A copy, so h_n is never a view of output.
  at::Tensor h_n = a.output[reverse ? 0 : T - 1].clone();
  return {a.output, h_n, a.workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_impl(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                  const at::Tensor& weight_hh, const at::Tensor& output,
                  const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                  bool has_bias, bool reset_after, bool reverse,
                  std::array<bool, 6> output_mask, BackwardLoop loop,
                  const BackendExtras& extras) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t H = check_forward_args(input, hx, weight_ih, weight_hh, std::nullopt,
                                       std::nullopt);
  const int64_t T = input.size(0), B = input.size(1), I = input.size(2);
  const CheckedLengths len = checked_lengths(lengths, T, B);
  check_shape(grad_output, {T, B, H}, "grad_output", "[T, B, H]");
  check_shape(grad_h_n, {B, H}, "grad_h_n", "[B, H]");
  check_shape(output, {T, B, H}, "output", "[T, B, H] (the forward's output)");
  check_shape(workspace, {kNumSlots, T, B, H}, "workspace",
              "[4, T, B, H] (the forward's workspace)");
  check_like(grad_output, input, "grad_output");
  check_like(grad_h_n, input, "grad_h_n");
  check_like(output, input, "output");
  check_like(workspace, input, "workspace");

  const auto empty = [&](const at::Tensor& like) { return like.new_empty({0}); };
  const bool any = std::any_of(output_mask.begin(), output_mask.end(), [](bool b) { return b; });
  if (!any) {
    return {empty(input), empty(hx), empty(weight_ih), empty(weight_hh), empty(weight_ih),
            empty(weight_ih)};
  }

  BackwardLoopArgs a;
  a.reset_after = reset_after;
  a.reverse = reverse;
  a.grad_output = grad_output.contiguous();
  a.grad_h_n = grad_h_n.contiguous();
  a.hx = hx.contiguous();
  a.weight_hh = weight_hh.contiguous();
  a.output = output.contiguous();
  a.workspace = workspace.contiguous();
  a.grad_hx = at::empty({B, H}, hx.options());
  if (extras.step_chunks) {
    a.dh = at::empty({B, H}, hx.options().dtype(at::toOpMathType(hx.scalar_type())));
  }

  // Padded positions (t >= lengths[b]) get dG = 0, but 0 * NaN is NaN: a padding left
  // as torch.empty would reach dW_ih through dG^T x, and dW_hn through r h when
  // !reset_after (the forward computed r from that padding). Those products see the
  // padding as zeros instead: [T, B, 1], true where the step is active, computed on
  // input's device.
  at::Tensor active;
  if (len.padded) {
    const at::Tensor lengths_dev = lengths_for_loops(len, input, extras);  // [B]
    active = (at::arange(T, lengths_dev.options()).unsqueeze(1) < lengths_dev.unsqueeze(0))
                 .unsqueeze(2);
  }
  const auto unpadded = [&](const at::Tensor& t) {  // t [T, B, .]
    return active.defined() ? at::where(active, t, at::zeros({}, t.options())) : t;
  };
  const at::Tensor cols =
      output_mask[2] && extras.one_hot ? extras.one_hot->columns(input) : at::Tensor();
  const at::Tensor x2d = output_mask[2] && !cols.defined()
                             ? unpadded(input).reshape({T * B, I})
                             : input.reshape({T * B, I});
  const at::Tensor rh_all = output_mask[3] && !reset_after  // r h [T, B, H]
                                ? unpadded(a.workspace[kSlotHn])
                                : at::Tensor();
  at::Tensor grad_input = empty(input), grad_weight_ih = empty(weight_ih);
  at::Tensor grad_weight_hh = empty(weight_hh);
  at::Tensor grad_bias_ih = empty(weight_ih), grad_bias_hh_n;  // [3H], [H]
  if (output_mask[0]) grad_input = empty_to_fill({T, B, I}, input.options());
  if (output_mask[3]) grad_weight_hh = at::empty({3 * H, H}, weight_hh.options());
  const bool bias_grads = has_bias && (output_mask[4] || output_mask[5]);

  const int64_t chunk = steps_per_chunk(extras, T, B * 3 * H * int64_t(input.element_size()));
  const HPrev h_prev(a.hx, a.output, reverse, chunk == T);
  // Chunks of iterations [i0, i1) from the last down; each adds its steps' share to the
  // gradients that sum over steps, in a fixed order.
  for (int64_t i1 = T; i1 > 0; i1 -= chunk) {
    const int64_t i0 = std::max<int64_t>(0, i1 - chunk), n = i1 - i0;
    const int64_t t0 = reverse ? T - i1 : i0;  // the chunk's steps are [t0, t0 + n)
    const bool first_chunk = i1 == T;
    a.dG = scratch(kScratchDG, {n, B, 3 * H}, input.options());
    a.dGh = reset_after ? scratch(kScratchDGh, {n, B, extras.dgh_candidate_only ? H : 3 * H},
                                  input.options())
                        : a.dG;
    a.iter_begin = i0;
    a.iter_end = i1;
    a.step0 = t0;
    if (B > 0) {
      loop(a);
    } else {  // the GEMMs below over zero rows then give zero weight gradients
      a.dG.zero_();
      a.dGh.zero_();
      a.grad_hx.zero_();
    }

    auto dG2d = a.dG.view({n * B, 3 * H});
    // dGh's candidate column [n * B, H], the only one read below: r, z would repeat dG's.
    auto dGh_n = a.dGh.view({n * B, a.dGh.size(2)})
                     .narrow(1, a.dGh.size(2) == H ? 0 : kGateN * H, H);
    if (output_mask[0]) {
      auto rows = grad_input.view({T * B, I}).narrow(0, t0 * B, n * B);
      at::mm_out(rows, dG2d, weight_ih);
    }
    // Column c of dG^T x sums the rows of dG whose input is e_c: a scatter-add for
    // one-hot x. Only for finite dG: the GEMM's 0 * inf carries a non-finite entry of
    // dG into every column of its row (as nn.GRU's does), the scatter would not. A
    // finite sum proves that in one cheap reduction; one that overflows merely sends
    // us to the GEMM.
    const bool scatter = cols.defined() && std::isfinite(dG2d.sum().item<double>());
    at::Tensor bias_part;  // this chunk's column sums of dG [3H]
    if (output_mask[2]) {
      at::Tensor part;
      if (scatter) {
        part = extras.one_hot->grad_weight(dG2d, cols.narrow(0, t0 * B, n * B), I);
        // After the scatter-add, the row sums of part [3H, I]: I values per gate unit
        // instead of n * B.
        if (bias_grads) bias_part = part.sum(1);
      } else {
        part = at::mm(dG2d.t(), x2d.narrow(0, t0 * B, n * B));
      }
      grad_weight_ih = first_chunk ? part : grad_weight_ih.add_(part);
    }
    if (output_mask[3]) {
      // Gates r, z see h_prev, with dGh = dG there. The candidate sees h_prev through
      // dGh's own column when reset_after, else r * h (saved in kSlotHn) through dG's.
      auto dW_rz = grad_weight_hh.narrow(0, 0, 2 * H);
      h_prev.mm(dW_rz, dG2d.narrow(1, 0, 2 * H), t0, n, !first_chunk);
      auto dW_hn = grad_weight_hh.narrow(0, kGateN * H, H);
      if (reset_after) {
        h_prev.mm(dW_hn, dGh_n, t0, n, !first_chunk);
      } else {
        auto rh = rh_all.narrow(0, t0, n).reshape({n * B, H});
        if (first_chunk) {
          at::mm_out(dW_hn, dG2d.narrow(1, kGateN * H, H).t(), rh);
        } else {
          dW_hn.addmm_(dG2d.narrow(1, kGateN * H, H).t(), rh);
        }
      }
    }
    if (bias_grads) {
      if (!bias_part.defined()) bias_part = dG2d.sum(0);
      grad_bias_ih = first_chunk ? bias_part : grad_bias_ih.add_(bias_part);
      if (reset_after && output_mask[5]) {
        auto part = dGh_n.sum(0);
        grad_bias_hh_n = first_chunk ? part : grad_bias_hh_n.add_(part);
      }
    }
  }

  // Padded positions take no part: their gradient is zero even where dG's zeros met a
  // non-finite weight_ih.
  if (output_mask[0]) grad_input = unpadded(grad_input);
  at::Tensor grad_hx = output_mask[1] ? a.grad_hx : empty(hx);
  at::Tensor grad_bias_hh = empty(weight_ih);
  if (bias_grads) {
    if (output_mask[5]) {
      // dGh equals dG but in the candidate's column when reset_after (and is dG when
      // not).
      grad_bias_hh = grad_bias_ih.clone();
      if (reset_after) grad_bias_hh.narrow(0, kGateN * H, H).copy_(grad_bias_hh_n);
    }
    if (!output_mask[4]) grad_bias_ih = empty(weight_ih);
  }
  if (!output_mask[2]) grad_weight_ih = empty(weight_ih);
  return {grad_input, grad_hx, grad_weight_ih, grad_weight_hh, grad_bias_ih, grad_bias_hh};
}

}  // namespace gru_fused
