// Which CUDA kernels run a call, and how the persistent ones are laid out: the one place
// where that is decided (tune it here when GPUs measure it). Plain C++ with no CUDA
// header: the CUDA backend plans every call with it, the emulation tests run the same
// plans, and the Python module reports them in any build (gru_fused.cuda_kernel_plan).
//
// The kernel families:
//   step         one launch per step (two for reset_before) of gru_kernels.cuh; W_hh is
//                read from L2 at every step. Any device, any dtype.
//   cluster      one launch per call (gru_persistent.cuh), sm_90: the grid is clusters of
//                C CTAs; each cluster owns a slice of the batch, each of its CTAs a slice
//                of the hidden units and their W_hh rows (backward: W_hh^T rows) in
//                shared memory for the whole sequence. The new state (backward: the
//                gate gradients) goes to every CTA of the cluster through distributed
//                shared memory, one cluster barrier per step (two for reset_before).
//   cooperative  one cooperative launch per call: one CTA per SM at most, each owning a
//                slice of the units (W_hh rows in shared memory) for the whole batch; the
//                state goes through global memory (L2) and a grid barrier per step.
//
// The choice, GRU_FUSED_CUDA_KERNEL=auto|step|persistent|cluster|cooperative (read at
// every call; unset: auto):
//   persistent   float64 runs on the step kernels (its W_hh slices do not fit, and its
//                step kernels are the reference of the others); otherwise the cluster
//                kernels when the device has clusters and a cluster's slices fit in
//                shared memory, else the cooperative kernels when the units' slices fit
//                in the shared memory of the SMs, else the step kernels.
//   cluster, cooperative   that family where it can run the call, else the step kernels.
//   step         the step kernels.
//   auto         the step kernels, for now: the performance model
//                (benchmarks/PERF_MODEL.md) estimates the persistent kernels as built
//                slower than the step kernels at every shape it prices (no GPU has
//                measured either). When a GPU shows where they win, auto becomes
//                `persistent` there: this function is the one place to say so.
// A persistent launch the device refuses (its blocks cannot be co-resident) runs the
// step kernels instead.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "cuda/gru_tiles.h"

namespace gru_fused {
namespace cuda {

// What the planner reads of a device (cudaDeviceGetAttribute on a GPU; the emulator's
// model in the tests).
struct DeviceProps {
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  size_t smem_per_block_optin = 0;  // the most dynamic shared memory one CTA may opt in to
  size_t smem_per_sm = 0;
  bool cooperative = false;         // cooperative launches (grid barrier)
  bool clusters = false;            // thread-block clusters and DSMEM (sm_90+)
  int max_cluster = -1;             // the widest cluster to plan; < 0: widest_cluster's rule
};

constexpr int kMaxPortableCluster = 8;
constexpr int kMaxNonPortableCluster = 16;

// The widest cluster the planner may use on `d`: d.max_cluster if set, else 16 on
// compute capability 9.0 and 10.0 (H100, H200, B200: non-portable sizes, which the
// kernels opt in to), else the portable 8; 0 without clusters. Whether a cluster fits is
// the occupancy API's answer at launch: a refused one is planned again half as wide
// (run_persistent, gru_device_loops.h).
inline int widest_cluster(const DeviceProps& d) {
  if (!d.clusters) return 0;
  if (d.max_cluster >= 0) return std::min(d.max_cluster, kMaxNonPortableCluster);
  const bool non_portable = d.cc_minor == 0 && (d.cc_major == 9 || d.cc_major == 10);
  return non_portable ? kMaxNonPortableCluster : kMaxPortableCluster;
}

enum class Family : int { kStep, kCluster, kCooperative };
enum class Choice : int { kAuto, kStep, kPersistent, kCluster, kCooperative };
enum class Direction : int { kForward, kBackward };

inline const char* family_name(Family f) {
  return f == Family::kCluster ? "cluster" : f == Family::kCooperative ? "cooperative" : "step";
}

// GRU_FUSED_CUDA_KERNEL, read at every call (unset or empty: auto).
inline Choice choice_from_env() {
  const char* v = std::getenv("GRU_FUSED_CUDA_KERNEL");
  const std::string s = v ? v : "";
  if (s.empty() || s == "auto") return Choice::kAuto;
  if (s == "step") return Choice::kStep;
  if (s == "persistent") return Choice::kPersistent;
  if (s == "cluster") return Choice::kCluster;
  if (s == "cooperative") return Choice::kCooperative;
  throw std::invalid_argument("gru_fused: GRU_FUSED_CUDA_KERNEL=" + s +
                              ": expected auto, step, persistent, cluster or cooperative");
}

// A persistent launch's geometry, as its kernel reads it: CTA x owns hidden units
// [x units, (x + 1) units); cluster y (cooperative: the one "cluster" of the whole grid)
// owns batch rows [y rows, (y + 1) rows).
struct PersistentShape {
  int cluster;  // CTAs per cluster (cluster family); CTAs of the grid (cooperative)
  int units;    // hidden units per CTA
  int rows;     // batch rows per cluster (cooperative: B)
  int clusters; // clusters in the grid (cooperative: 1)
};

inline size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// A persistent CTA's dynamic shared memory, in byte offsets (16-byte aligned sections):
//   w        forward: W_hh's rows of the CTA's units, [3][units][H] (gate-major, as W_hh);
//            backward: W_hh^T's rows of its units, [units][3H]
//   buf      cluster only, the exchanged rows of the cluster's batch slice, two buffers
//            (even and odd steps): forward [2][rows][H] states h, backward [2][rows][3H]
//            gate gradients (reset_after: dGh; reset_before: dG)
//   rh       cluster forward, reset_before only: r h of every unit, [rows][H]
//   scratch  the matmul's tile (acc_t), as the step kernels' launches have it
struct PersistentLayout {
  size_t w, buf, buf_bytes, rh, scratch, total;
};

inline size_t max_size(size_t a, size_t b) { return a > b ? a : b; }

template <typename acc_t>
size_t persistent_scratch_bytes(Direction dir, bool reset_after) {
  if (dir == Direction::kBackward) return OneGateTile::smem_bytes<acc_t>();
  return reset_after ? ForwardFusedTile<acc_t>::template smem_bytes<acc_t>()
                     : max_size(ForwardResetTile<acc_t>::template smem_bytes<acc_t>(),
                                OneGateTile::smem_bytes<acc_t>());
}

inline PersistentLayout persistent_layout(Direction dir, Family f, bool reset_after,
                                          size_t scalar_bytes, size_t scratch_bytes, int H,
                                          const PersistentShape& g) {
  const bool cluster = f == Family::kCluster, fwd = dir == Direction::kForward;
  PersistentLayout L;
  L.w = 0;
  L.buf = align16(size_t(3) * g.units * H * scalar_bytes);
  L.buf_bytes = cluster ? align16(size_t(g.rows) * (fwd ? H : 3 * H) * scalar_bytes) : 0;
  L.rh = L.buf + 2 * L.buf_bytes;
  L.scratch = L.rh + (cluster && fwd && !reset_after ? align16(size_t(g.rows) * H * scalar_bytes) : 0);
  L.total = L.scratch + scratch_bytes;
  return L;
}

// The rows of a tile: the row count that a cluster's batch slice is a multiple of, so
// that no cluster computes more empty tile rows than it must.
inline int tile_rows(Direction dir, size_t acc_bytes, bool reset_after) {
  if (dir == Direction::kBackward) return OneGateTile::kRows;
  const int fused = acc_bytes > 4 ? ForwardFusedTile<double>::kRows : ForwardFusedTile<float>::kRows;
  const int reset = acc_bytes > 4 ? ForwardResetTile<double>::kRows : ForwardResetTile<float>::kRows;
  return reset_after ? fused : reset;
}

struct Plan {
  DeviceProps device;  // the device planned for (the launch's occupancy checks read it)
  Family family = Family::kStep;
  PersistentShape shape{0, 0, 0, 0};
  PersistentLayout layout{0, 0, 0, 0, 0, 0};  // layout.total: shared memory per CTA, bytes
  std::string why;                            // one line: why this family
};

inline int ceil_div_i(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// The plan of one call's loop (forward or backward) for a device. scalar_bytes: the
// tensors' element size; acc_bytes: the accumulate type's (float for half/bfloat16).
inline Plan plan_kernel(const DeviceProps& d, Direction dir, size_t scalar_bytes,
                        size_t acc_bytes, int64_t H, int64_t B, bool reset_after, Choice choice) {
  Plan plan;
  plan.device = d;
  if (choice == Choice::kStep) {
    plan.why = "GRU_FUSED_CUDA_KERNEL=step";
    return plan;
  }
  if (choice == Choice::kAuto) {
    plan.why = "auto: the step kernels, estimated faster than the persistent kernels as "
               "built (benchmarks/PERF_MODEL.md); GRU_FUSED_CUDA_KERNEL=persistent runs those";
    return plan;
  }
  if (scalar_bytes > 4) {
    plan.why = "float64 runs on the step kernels";
    return plan;
  }
  const size_t scratch = acc_bytes > 4 ? persistent_scratch_bytes<double>(dir, reset_after)
                                       : persistent_scratch_bytes<float>(dir, reset_after);
  const bool want_cluster = choice != Choice::kCooperative;
  const bool want_cooperative = choice != Choice::kCluster;
  std::string no;
  if (want_cluster && !d.clusters) no = "no thread-block clusters (sm_90+)";
  if (want_cluster && d.clusters) {
    // The widest cluster (a power of two up to widest_cluster) in which every CTA has
    // units: more SMs per cluster, smaller W_hh slices.
    const int rows_per_tile = tile_rows(dir, acc_bytes, reset_after);
    int widest = 1;
    while (widest * 2 <= widest_cluster(d)) widest *= 2;
    for (int C = widest; C >= 2; C /= 2) {
      const int units = ceil_div_i(H, C);
      if (int64_t(C - 1) * units >= H) continue;
      // As many clusters as the SMs hold (one CTA per SM), each at least a tile of rows.
      const int fit = d.sm_count / C;
      if (fit < 1) continue;
      const int clusters0 = std::max(1, std::min(fit, ceil_div_i(B, rows_per_tile)));
      const int rows = ceil_div_i(B, clusters0);
      const PersistentShape g{C, units, rows, ceil_div_i(B, rows)};
      const PersistentLayout L = persistent_layout(dir, Family::kCluster, reset_after,
                                                   scalar_bytes, scratch, int(H), g);
      if (L.total > d.smem_per_block_optin) {
        // A narrower cluster holds more of W_hh per CTA but, with more clusters, fewer
        // rows to exchange: it may still fit.
        no = "a cluster's W_hh slices (" + std::to_string(L.total) + " bytes per CTA) exceed " +
             std::to_string(d.smem_per_block_optin) + " bytes of shared memory";
        continue;
      }
      plan.family = Family::kCluster;
      plan.shape = g;
      plan.layout = L;
      plan.why = "W_hh fits in a cluster of " + std::to_string(C) + " CTAs";
      return plan;
    }
    if (no.empty()) no = "no cluster fits H=" + std::to_string(H);
  }
  if (want_cooperative && d.cooperative && d.sm_count > 0) {
    // One CTA per SM at most, each at least one tile of units if W_hh fits so, else as
    // many CTAs as SMs (smaller slices, part-empty tiles).
    const int per_tile = dir == Direction::kBackward ? OneGateTile::kUnits : kWarps;
    for (int ctas0 : {std::min(d.sm_count, ceil_div_i(H, per_tile)), d.sm_count}) {
      const int units = ceil_div_i(H, std::max(1, ctas0));
      const PersistentShape g{ceil_div_i(H, units), units, int(B), 1};
      const PersistentLayout L = persistent_layout(dir, Family::kCooperative, reset_after,
                                                   scalar_bytes, scratch, int(H), g);
      if (L.total > d.smem_per_block_optin) continue;
      plan.family = Family::kCooperative;
      plan.shape = g;
      plan.layout = L;
      plan.why = (no.empty() ? std::string() : no + "; ") +
                 "W_hh fits in the shared memory of " + std::to_string(g.cluster) + " SMs";
      return plan;
    }
    no = (no.empty() ? std::string() : no + "; ") + "W_hh's slices over " +
         std::to_string(d.sm_count) + " SMs exceed " + std::to_string(d.smem_per_block_optin) +
         " bytes of shared memory each";
  } else if (want_cooperative) {
    no = (no.empty() ? std::string() : no + "; ") + "no cooperative launch";
  }
  plan.why = no;
  return plan;
}

}  // namespace cuda
}  // namespace gru_fused
