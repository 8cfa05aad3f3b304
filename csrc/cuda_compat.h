// What the kernels need from CUDA, either the real thing (nvcc) or the emulation layer
// that runs them on the CPU in the tests (GRU_EMULATE_CUDA, see emu/cuda_emu.h).
#pragma once

#if defined(GRU_EMULATE_CUDA)
#include "emu/cuda_emu.h"

using gru_stream_t = gru_emu::stream_t;
#define GRU_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(gru_emu::tls.smem)
#define GRU_LAUNCH(kernel, grid, block, smem, stream, ...) \
  gru_emu::launch(kernel, grid, block, smem, __VA_ARGS__)
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
#endif
