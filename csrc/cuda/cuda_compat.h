// What the kernels need from CUDA, either the real thing (nvcc) or the emulation layer
// that runs them on the CPU in the tests (GRU_EMULATE_CUDA, see emu/cuda_emu.h).
//
//   GRU_DYNAMIC_SMEM(type, name)     the block's dynamic shared memory as type*
//   GRU_LAUNCH(kernel, grid, block, smem, stream, args...)   a checked launch
//   GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes)   opt a kernel in to more than 48 KB of
//                                             dynamic shared memory (up to 227 KB, sm_90)
//   GRU_UNROLL                       `GRU_UNROLL for (...)`: unroll a constant-trip loop
//   __launch_bounds__(n), __restrict__ work in both.
#pragma once

#if defined(GRU_EMULATE_CUDA)
#include "emu/cuda_emu.h"

using gru_stream_t = gru_emu::stream_t;
#define GRU_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(gru_emu::current().smem)
// The stream is ignored: launches run one after another, in the order issued.
#define GRU_LAUNCH(kernel, grid, block, smem, stream, ...)                               \
  gru_emu::launch(gru_emu::LaunchSite{#kernel, __FILE__, __LINE__}, kernel, grid, block, \
                  smem, __VA_ARGS__)
#define GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes) gru_emu::set_max_dynamic_smem(kernel, bytes)
// Loop unrolling is a code-generation hint: nothing to model on the CPU.
#define GRU_UNROLL
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
// `GRU_UNROLL for (...)`: unrolls a loop whose trip count is a compile-time constant.
#define GRU_UNROLL _Pragma("unroll")
#endif
