// What the kernels need from CUDA, either the real thing (nvcc) or the emulation layer
// that runs them on the CPU in the tests (GRU_EMULATE_CUDA, see emu/cuda_emu.h).
//
//   GRU_DYNAMIC_SMEM(type, name)     the block's dynamic shared memory as type*
//   GRU_LAUNCH(kernel, grid, block, smem, stream, args...)   a checked launch
//   GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes)   opt a kernel in to more than 48 KB of
//                                             dynamic shared memory (up to 227 KB, sm_90)
//   GRU_ALLOW_NON_PORTABLE_CLUSTER(kernel)    allow clusters of up to 16 CTAs (sm_90);
//                                             false where the device does not
//   GRU_UNROLL                       `GRU_UNROLL for (...)`: unroll a constant-trip loop
//   __launch_bounds__(n), __restrict__ work in both.
//
// The persistent kernels' share (gru_persistent.cuh):
//   GRU_CLUSTER_SYNC()               barrier of every thread of the block's thread-block
//                                    cluster; release/acquire at cluster scope (sm_90)
//   gru_cluster_rank()               the block's rank in its cluster, 0 .. cluster size - 1
//   gru_map_shared_rank(p, rank)     p (into this block's dynamic shared memory) mapped to
//                                    the same offset in cluster block `rank` (DSMEM)
//   GRU_GRID_SYNC()                  barrier of every thread of a cooperative launch
//   GRU_LAUNCH_CLUSTER(kernel, grid, block, smem, cluster_x, stream, args...)
//   GRU_LAUNCH_COOPERATIVE(kernel, grid, block, smem, stream, args...)
//                                    both evaluate to false, launching nothing, when the
//                                    device cannot make the blocks (of a cluster, of the
//                                    grid) co-resident; any other error throws
//   gru_max_active_blocks_per_sm(kernel, threads, smem)   the occupancy API, and
//   gru_max_active_clusters(kernel, grid, block, smem, cluster_x)   for clusters
//   gru_kernel_has_sm90_code(kernel) whether the code the device would run for `kernel`
//                                    was compiled for sm_90+ (not JIT-compiled from an
//                                    older architecture's PTX, which has no clusters)
#pragma once

#include <cstddef>


#if defined(GRU_EMULATE_CUDA)
#include "emu/cuda_emu.h"

using gru_stream_t = gru_emu::stream_t;
#define GRU_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(gru_emu::current().smem)
// The stream is ignored: launches run one after another, in the order issued.
#define GRU_LAUNCH(kernel, grid, block, smem, stream, ...)                               \
  gru_emu::launch(gru_emu::LaunchSite{#kernel, __FILE__, __LINE__}, kernel, grid, block, \
                  smem, __VA_ARGS__)
#define GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes) gru_emu::set_max_dynamic_smem(kernel, bytes)
#define GRU_ALLOW_NON_PORTABLE_CLUSTER(kernel) (gru_emu::allow_non_portable_cluster(kernel), true)
// Loop unrolling is a code-generation hint: nothing to model on the CPU.
#define GRU_UNROLL
// The source line identifies the barrier, as for __syncthreads().
#define GRU_CLUSTER_SYNC() gru_emu::cluster_sync(__FILE__, __LINE__)
#define GRU_GRID_SYNC() gru_emu::grid_sync(__FILE__, __LINE__)
#define gru_cluster_rank() gru_emu::cluster_rank()
#define gru_map_shared_rank(p, rank) gru_emu::map_shared_rank((p), (rank))
#define GRU_LAUNCH_CLUSTER(kernel, grid, block, smem, cluster_x, stream, ...)                  \
  gru_emu::launch_cluster(gru_emu::LaunchSite{#kernel, __FILE__, __LINE__}, kernel, grid, block, \
                          smem, cluster_x, __VA_ARGS__)
#define GRU_LAUNCH_COOPERATIVE(kernel, grid, block, smem, stream, ...)                          \
  gru_emu::launch_cooperative(gru_emu::LaunchSite{#kernel, __FILE__, __LINE__}, kernel, grid,    \
                              block, smem, __VA_ARGS__)
#define gru_max_active_blocks_per_sm(kernel, threads, smem) \
  gru_emu::max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), threads, smem)
#define gru_max_active_clusters(kernel, grid, block, smem, cluster_x)                       \
  gru_emu::max_active_clusters(reinterpret_cast<const void*>(kernel), grid, block, smem, \
                               cluster_x)
// The emulated device runs the source itself; GRU_EMU_CC decides whether it has clusters.
#define gru_kernel_has_sm90_code(kernel) true
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

using gru_stream_t = cudaStream_t;
#define GRU_DYNAMIC_SMEM(type, name)                                   \
  extern __shared__ __align__(16) unsigned char gru_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(gru_dynamic_smem_)
// Every launch is checked right away, so an error names the kernel that caused it.
#define GRU_LAUNCH(kernel, grid, block, smem, stream, ...)      \
  do {                                                          \
    kernel<<<grid, block, smem, stream>>>(__VA_ARGS__);         \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                             \
  } while (0)
// A launch with more than 48 KB of dynamic shared memory fails unless the kernel's
// attribute allows it; set once per kernel (and device) before its first launch.
#define GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes)                                      \
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel,                                        \
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                      static_cast<int>(bytes)))
// Clusters of up to 16 CTAs for `kernel` (sm_90 allows 16 with this attribute; 8 is the
// portable maximum); false, with the error cleared, where the device does not take it.
// Whether a given cluster fits is still the occupancy API's answer.
#define GRU_ALLOW_NON_PORTABLE_CLUSTER(kernel) \
  gru_fused::cuda_launch::allow_non_portable_cluster(reinterpret_cast<const void*>(kernel))
// `GRU_UNROLL for (...)`: unrolls a loop whose trip count is a compile-time constant.
#define GRU_UNROLL _Pragma("unroll")

#include <cooperative_groups.h>

#include <utility>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
// Clusters need sm_90: the cluster kernels are compiled for every architecture but
// launched only where the planner saw clusters (gru_persistent_plan.h).
#define GRU_CLUSTER_SYNC() __trap()
#define gru_cluster_rank() 0u
#define gru_map_shared_rank(p, rank) (__trap(), (p))
#else
#define GRU_CLUSTER_SYNC() cooperative_groups::this_cluster().sync()
#define gru_cluster_rank() cooperative_groups::this_cluster().block_rank()
#define gru_map_shared_rank(p, rank) cooperative_groups::this_cluster().map_shared_rank((p), (rank))
#endif
#define GRU_GRID_SYNC() cooperative_groups::this_grid().sync()

namespace gru_fused {
namespace cuda_launch {

// Errors that mean "these blocks cannot be co-resident on this device": the caller
// falls back to the step kernels. The sticky error state is cleared.
inline bool cannot_co_schedule(cudaError_t e) {
  if (e != cudaErrorCooperativeLaunchTooLarge && e != cudaErrorInvalidClusterSize &&
      e != cudaErrorLaunchOutOfResources) {
    return false;
  }
  (void)cudaGetLastError();
  return true;
}

// cudaLaunchKernelEx with one attribute: a cluster of cluster_x blocks along x, or a
// cooperative launch (cluster_x == 0).
template <typename... KArgs, typename... Args>
bool launch_ex(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
               cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  if (cluster_x > 0) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_x;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
  } else {
    attribute[0].id = cudaLaunchAttributeCooperative;
    attribute[0].val.cooperative = 1;
  }
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (cannot_co_schedule(e)) return false;
  C10_CUDA_CHECK(e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

inline bool allow_non_portable_cluster(const void* kernel) {
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) ==
      cudaSuccess) {
    return true;
  }
  (void)cudaGetLastError();
  return false;
}

// cudaFuncGetAttributes: ptxVersion is the architecture of the PTX the device's code
// came from (80 for sm_80 PTX JIT-compiled on an sm_90), binaryVersion that of the code.
inline bool has_sm90_code(const void* kernel) {
  cudaFuncAttributes a = {};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&a, kernel));
  return a.ptxVersion >= 90 && a.binaryVersion >= 90;
}

inline int max_active_blocks_per_sm(const void* kernel, int threads, size_t smem) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, smem));
  return blocks;
}

template <typename... KArgs>
int max_active_clusters(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem,
                        unsigned cluster_x) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = cluster_x;
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  int clusters = 0;
  const cudaError_t e = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (cannot_co_schedule(e)) return 0;
  C10_CUDA_CHECK(e);
  return clusters;
}

}  // namespace cuda_launch
}  // namespace gru_fused

#define GRU_LAUNCH_CLUSTER(kernel, grid, block, smem, cluster_x, stream, ...) \
  gru_fused::cuda_launch::launch_ex(kernel, grid, block, smem, cluster_x, stream, __VA_ARGS__)
#define GRU_LAUNCH_COOPERATIVE(kernel, grid, block, smem, stream, ...) \
  gru_fused::cuda_launch::launch_ex(kernel, grid, block, smem, 0u, stream, __VA_ARGS__)
#define gru_max_active_blocks_per_sm(kernel, threads, smem)                                  \
  gru_fused::cuda_launch::max_active_blocks_per_sm(reinterpret_cast<const void*>(kernel), \
                                                   threads, smem)
#define gru_max_active_clusters(kernel, grid, block, smem, cluster_x) \
  gru_fused::cuda_launch::max_active_clusters(kernel, grid, block, smem, cluster_x)
#define gru_kernel_has_sm90_code(kernel) \
  gru_fused::cuda_launch::has_sm90_code(reinterpret_cast<const void*>(kernel))

#endif
