// CUDA backend: registers the fused kernels (gru_kernels.cuh) for CUDA tensors.
// Launches go to the current stream under a device guard; nothing synchronises with the
// host (lengths too reach the GPU without: LengthsCache), so forward + backward can be
// graph-captured, packed input included.
//
// Host code only, compiled by the host compiler: the kernels and their launch loops are
// compiled by nvcc in gru_cuda.cu, which thus parses no ATen or torch header (nvcc
// parses a file's host includes once per GPU architecture and once more for the host).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS  // per-operator headers only (gru_driver.cpp)
#ifndef AT_PER_OPERATOR_HEADERS
#define AT_PER_OPERATOR_HEADERS
#endif

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>  // CUDAStreamCaptureModeGuard
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <list>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "cuda/gru_device_loops.h"

namespace gru_fused {
namespace {

// lengths [B] on the GPU for every call with padded sequences (each layer and direction,
// forward and backward), without a host synchronisation: a copy kept per distinct value
// vector, the key compared on the host. Packed batches of a training loop repeat a few
// vectors, or one per batch; either way a call costs one lookup and at most one
// asynchronous copy.
//
// Streams. A copy is made on the caller's current stream and an event recorded after
// it. The tensor is only read from then on: a call on another stream waits for that
// event on its stream (no host wait) and records its use with the caching allocator, so
// that evicting the entry cannot free memory that stream's kernels still read.
//
// CUDA graphs. A captured kernel reads the device copy at every replay, and nothing
// tells us when the graph dies: an entry used during a capture is kept for good (never
// evicted, kept by empty_cache). It must also be complete before any replay, and a
// graph cannot wait on an event recorded outside it, so during capture the host waits
// for the copy once (in relaxed capture mode, where that is allowed; with
// torch.cuda.graph, which synchronises before capturing, it has finished long since).
// Lengths first seen during a capture are copied eagerly on a side stream that is not
// capturing, the host waiting for it: nothing is captured, so no replay depends on host
// memory (a captured copy would re-read its pinned source at every replay).
// Two consequences for graph users: a graph reads the lengths it was captured with
// (changing a CPU lengths tensor in place between replays changes nothing: capture
// another graph), and the device copies graphs read are never freed (B int64 each, one
// per distinct lengths vector captured).
class LengthsCache {
 public:
  static LengthsCache& instance() {
    static auto* cache = new LengthsCache();  // never destroyed: the CUDA runtime may go first
    return *cache;
  }

  // lengths [B] int64, contiguous, on the CPU -> [B] int64 on device; only to be read.
  at::Tensor get(const at::Tensor& lengths, c10::Device device) {
    TORCH_INTERNAL_ASSERT(lengths.is_cpu() && lengths.scalar_type() == at::kLong &&
                          lengths.is_contiguous() && device.is_cuda());
    const int64_t B = lengths.numel();
    const int64_t* values = lengths.const_data_ptr<int64_t>();
    const std::string_view bytes(reinterpret_cast<const char*>(values), B * sizeof(int64_t));
    const size_t hash = std::hash<std::string_view>{}(bytes);
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    const bool capturing = status != cudaStreamCaptureStatusNone;

    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device != device.index() || it->hash != hash || it->values.size() != size_t(B) ||
          std::memcmp(it->values.data(), values, bytes.size()) != 0) {
        continue;
      }
      entries_.splice(entries_.begin(), entries_, it);  // most recently used first
      Entry& e = entries_.front();
      if (capturing) {
        e.captured = true;
        if (!e.complete) {
          const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
          C10_CUDA_CHECK(cudaEventSynchronize(e.copied.get()));
          e.complete = true;
        }
      } else if (e.stream != stream) {
        if (!e.complete) C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), e.copied.get(), 0));
        c10::cuda::CUDACachingAllocator::recordStream(e.on_device.storage().data_ptr(), stream);
      }
      return e.on_device;
    }

    // A miss: the new entry joins the list once its copy is under way.
    std::list<Entry> fresh;
    if (capturing) {
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      copy_beside_capture(fresh.emplace_back(device.index(), hash, values, B, stream), device);
    } else {
      Entry& e = fresh.emplace_back(device.index(), hash, values, B, stream);
      // Through pinned memory, so the copy is asynchronous; the caching host allocator
      // reuses that block only once the copy is done.
      at::Tensor pinned = at::empty({B}, at::TensorOptions(at::kLong).pinned_memory(true));
      std::memcpy(pinned.mutable_data_ptr<int64_t>(), values, bytes.size());
      e.on_device = at::empty({B}, at::TensorOptions(at::kLong).device(device));
      e.on_device.copy_(pinned, /*non_blocking=*/true);
      C10_CUDA_CHECK(cudaEventRecord(e.copied.get(), stream.stream()));
    }
    entries_.splice(entries_.begin(), fresh);
    if (!capturing) evict_beyond(kMaxEntries);
    return entries_.front().on_device;
  }

  // Drops every entry no captured graph reads.
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    evict_beyond(0);
  }

 private:
  static constexpr size_t kMaxEntries = 64;  // not counting those kept for CUDA graphs

  // An event of its own per entry (created on construction, destroyed with the entry).
  class Event {
   public:
    Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
    ~Event() { C10_CUDA_CHECK_WARN(cudaEventDestroy(event_)); }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    cudaEvent_t get() const { return event_; }

   private:
    cudaEvent_t event_ = nullptr;
  };

  struct Entry {
    Entry(c10::DeviceIndex device, size_t hash, const int64_t* values, int64_t B,
          c10::cuda::CUDAStream stream)
        : device(device), hash(hash), values(values, values + B), stream(stream) {}
    c10::DeviceIndex device;
    size_t hash;
    std::vector<int64_t> values;  // the key: lengths [B]
    c10::cuda::CUDAStream stream;  // the copy's stream
    at::Tensor on_device;          // [B] int64
    Event copied;                  // recorded after the copy on `stream`
    bool complete = false;         // the copy is known to have finished
    bool captured = false;         // read by a captured CUDA graph: kept for good
  };

  // During a capture, in relaxed capture mode: the copy on a stream that is not
  // capturing, the host waiting for it. The allocation too is made for that stream, so
  // it comes from the ordinary pool, not the graph's.
  void copy_beside_capture(Entry& e, c10::Device device) {
    const c10::cuda::CUDAStream side = side_stream(device.index());
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      e.on_device = at::empty({int64_t(e.values.size())},
                              at::TensorOptions(at::kLong).device(device));
    }
    C10_CUDA_CHECK(cudaMemcpyAsync(e.on_device.mutable_data_ptr<int64_t>(), e.values.data(),
                                   e.values.size() * sizeof(int64_t), cudaMemcpyHostToDevice,
                                   side.stream()));
    C10_CUDA_CHECK(cudaStreamSynchronize(side.stream()));
    e.stream = side;
    e.complete = true;
    e.captured = true;
  }

  // One stream per device that no capture uses, created when first needed (a pool
  // stream could be the very one capturing).
  c10::cuda::CUDAStream side_stream(c10::DeviceIndex device) {
    for (const auto& [index, stream] : side_streams_) {
      if (index == device) return stream;
    }
    const c10::cuda::CUDAGuard on_device(device);
    cudaStream_t raw = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&raw, cudaStreamNonBlocking));  // never destroyed
    side_streams_.emplace_back(device, c10::cuda::getStreamFromExternal(raw, device));
    return side_streams_.back().second;
  }

  // Drops the least recently used entries but `keep` of those no graph reads. Called
  // outside captures only.
  void evict_beyond(size_t keep) {
    size_t seen = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->captured || ++seen <= keep) {
        ++it;
      } else {
        it = entries_.erase(it);
      }
    }
  }

  std::mutex mu_;
  std::list<Entry> entries_;  // most recently used first
  std::vector<std::pair<c10::DeviceIndex, c10::cuda::CUDAStream>> side_streams_;
};

at::Tensor lengths_to_device(const at::Tensor& lengths, c10::Device device) {
  return LengthsCache::instance().get(lengths, device);
}

// CUDA's loops run all steps on full-size buffers; only lengths need a hook.
const BackendExtras kCudaExtras{/*one_hot=*/nullptr, /*step_chunks=*/false,
                                /*dgh_candidate_only=*/false, &lengths_to_device};

// The kernels' shared memory is fixed by their tiles: at most kMaxSmemBytes,
// about 25 KB, within the 48 KB any CUDA GPU grants a block without opting in. Checked
// against what the device reports (an attribute query: no sync, fine during capture).
void check_shared_memory(c10::DeviceIndex device) {
  constexpr size_t needed = cuda::kMaxSmemBytes;
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlock, device));
  TORCH_CHECK(needed <= static_cast<size_t>(limit), "gru_fused: the CUDA kernels need ", needed,
              " bytes of shared memory per block; device ", int(device), " allows ", limit);
}

void forward_loop_cuda(const ForwardLoopArgs& a) {
  const c10::DeviceIndex device = a.gi.device().index();
  check_shared_memory(device);
  cuda::forward_loop_device(a, cuda::device_props(device), c10::cuda::getCurrentCUDAStream(device));
}

void backward_loop_cuda(const BackwardLoopArgs& a) {
  const c10::DeviceIndex device = a.dG.device().index();
  check_shared_memory(device);
  cuda::backward_loop_device(a, cuda::device_props(device), c10::cuda::getCurrentCUDAStream(device));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gru_forward_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths,
                          reset_after, reverse, &forward_loop_cuda, kCudaExtras);
}

// gru_forward without a workspace for a backward: the kernels reuse one step's slots
// [4, 1, B, H] (ForwardParams::ws_steps = 1).
std::tuple<at::Tensor, at::Tensor> gru_inference_cuda(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& lengths,
    bool reset_after, bool reverse) {
  const c10::cuda::CUDAGuard guard(input.device());
  auto [output, h_n, workspace] =
      gru_forward_impl(input, hx, weight_ih, weight_hh, bias_ih, bias_hh, lengths, reset_after,
                       reverse, &forward_loop_cuda, kCudaExtras, /*keep_workspace=*/false);
  return {output, h_n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cuda(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                  const at::Tensor& input, const at::Tensor& hx, const at::Tensor& weight_ih,
                  const at::Tensor& weight_hh, const at::Tensor& output,
                  const at::Tensor& workspace, const std::optional<at::Tensor>& lengths,
                 bool has_bias, bool reset_after, bool reverse,
                  std::array<bool, 6> output_mask) {
  const c10::cuda::CUDAGuard guard(input.device());
  return gru_backward_impl(grad_output, grad_h_n, input, hx, weight_ih, weight_hh, output,
                           workspace, lengths, has_bias, reset_after, reverse, output_mask,
                           &backward_loop_cuda, kCudaExtras);
}

}  // namespace

void empty_cuda_lengths_cache() { LengthsCache::instance().clear(); }

namespace cuda {

// Declared in gru_kernel_params.h.
const DeviceProps& device_props(int device) {
  TORCH_CHECK(device >= 0, "gru_fused: device_props: device index ", device, " is not a CUDA device");
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceProps>> known;
  std::lock_guard<std::mutex> lock(mu);
  if (known.size() <= size_t(device)) known.resize(size_t(device) + 1);
  if (!known[device]) {
    auto get = [device](cudaDeviceAttr attribute) {
      int v = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attribute, device));
      return v;
    };
    auto d = std::make_unique<DeviceProps>();
    d->cc_major = get(cudaDevAttrComputeCapabilityMajor);
    d->cc_minor = get(cudaDevAttrComputeCapabilityMinor);
    d->sm_count = get(cudaDevAttrMultiProcessorCount);
    d->smem_per_block_optin = size_t(get(cudaDevAttrMaxSharedMemoryPerBlockOptin));
    d->smem_per_sm = size_t(get(cudaDevAttrMaxSharedMemoryPerMultiprocessor));
    d->cooperative = get(cudaDevAttrCooperativeLaunch) != 0;
    d->clusters = d->cc_major >= 9 && get(cudaDevAttrClusterLaunch) != 0;
    known[device] = std::move(d);
  }
  return *known[device];
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(gru_fused, CUDA, m) {
  m.impl("gru_forward", &gru_forward_cuda);
  m.impl("gru_inference", &gru_inference_cuda);
  m.impl("gru_backward", &gru_backward_cuda);
}

}  // namespace gru_fused
