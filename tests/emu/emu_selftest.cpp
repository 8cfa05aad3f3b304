// The emulation layer's own detectors, proven on toy kernels, independent of the GRU
// kernels. tests/test_emulation.py builds this with g++ -DGRU_EMULATE_CUDA, once with
// -fsanitize=thread and once with -fsanitize=address, and runs it once per mode (argv[1]):
//   clean             barriers in uniform code, a thread returning after the last
//                     barrier, 64 KB of shared memory after opting in, the seeded block
//                     order: must pass, both sanitizers silent;
//   divergent_site    __syncthreads() on both arms of an if on threadIdx: must fail;
//   early_return      part of the block returns before a barrier: must fail;
//   uneven_loop       a barrier in a loop whose trip count depends on threadIdx: must fail;
//   missing_barrier   threads read a neighbour's shared memory without a barrier:
//                     ThreadSanitizer must report a data race;
//   stack_overflow    a read past a local array, in a frame suspended at a barrier:
//                     AddressSanitizer must report it (built with -fsanitize=address);
//   cross_block_race  every block writes one global element (one block late): ThreadSanitizer
//                     must report a data race;
//   smem_over_default 48 KB + 1 without opting in: must fail;
//   smem_over_opt_in  one byte over the kernel's opt-in: must fail;
//   opt_in_too_big    an opt-in over 227 KB: must fail;
//   block_too_big     a block of 1025 threads: must fail.
// A launch that fails throws std::runtime_error / std::invalid_argument; this program
// prints "launch failed: <message>" and exits with 3, or with 0 when everything passed.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda/cuda_compat.h"

namespace {

// out[block] = sum of in[block * n .. (block + 1) * n), n = blockDim.x, through shared
// memory: a tree reduction whose barriers every thread reaches.
__global__ void block_sum(const float* in, float* out, int valid) {
  GRU_DYNAMIC_SMEM(float, s);
  const unsigned t = threadIdx.x, n = blockDim.x;
  const unsigned g = blockIdx.x * n + t;
  s[t] = g < unsigned(valid) ? in[g] : 0.0f;
  __syncthreads();
  for (unsigned half = n / 2; half > 0; half /= 2) {
    if (t < half) s[t] += s[t + half];
    __syncthreads();
  }
  if (t != 0) return;  // after the last barrier: fine
  out[blockIdx.x] = s[0];
}

// Touches all of a large dynamic shared memory (launched with `bytes`).
__global__ void big_smem(size_t bytes, int* ok) {
  GRU_DYNAMIC_SMEM(unsigned char, s);
  for (size_t i = threadIdx.x; i < bytes; i += blockDim.x) s[i] = 1;
  __syncthreads();
  if (threadIdx.x == 0) {
    size_t sum = 0;
    for (size_t i = 0; i < bytes; ++i) sum += s[i];
    ok[blockIdx.x] = sum == bytes;
  }
}

__global__ void divergent_site(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

__global__ void early_return(int* out) {
  if (threadIdx.x >= 20) return;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

__global__ void uneven_loop(int* out) {
  for (unsigned k = 0; k <= threadIdx.x % 2; ++k) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

// Reads a neighbour's shared-memory slot with no barrier after the writes.
__global__ void missing_barrier(int* out) {
  GRU_DYNAMIC_SMEM(int, s);
  const unsigned t = threadIdx.x;
  s[t] = int(t);
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// A local array read one past its end after a barrier: the frame was suspended there,
// and its redzones must have survived the fiber switches.
__global__ void stack_overflow(int* out, int n) {
  volatile int local[4] = {1, 2, 3, 4};
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = local[threadIdx.x == 0 ? n : 0];
}

// Each block's thread 0 writes the same element; block 1 does so 50 ms later, so only
// the absence of any happens-before edge between blocks lets the race be seen.
__global__ void cross_block_race(int* out) {
  __syncthreads();
  if (threadIdx.x != 0) return;
  if (blockIdx.x == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  out[0] = int(blockIdx.x);
}

__global__ void noop(int*) {}

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

void clean() {
  // Several waves of several blocks, a partial last block.
  const int n = 64, blocks = 40, valid = n * blocks - 7;
  std::vector<float> in(n * blocks), out(blocks, -1.0f);
  for (int i = 0; i < n * blocks; ++i) in[i] = float(i % 13);
  for (uint64_t seed : {1, 2}) {
    gru_emu::set_seed(seed);
    GRU_LAUNCH(block_sum, dim3(blocks), dim3(n), n * sizeof(float), nullptr, in.data(),
               out.data(), valid);
    for (int b = 0; b < blocks; ++b) {
      float want = 0;
      for (int i = b * n; i < (b + 1) * n && i < valid; ++i) want += in[i];
      expect(out[b] == want, "block_sum");
    }
  }
  gru_emu::clear_seed();

  // Exactly 48 KB needs no opt-in; 64 KB does.
  std::vector<int> ok(3, 0);
  GRU_LAUNCH(big_smem, dim3(3), dim3(128), gru_emu::kDefaultSmemBytes, nullptr,
             gru_emu::kDefaultSmemBytes, ok.data());
  expect(ok[0] && ok[1] && ok[2], "48 KB of shared memory");
  GRU_SET_MAX_DYNAMIC_SMEM(big_smem, 64 * 1024);
  ok.assign(3, 0);
  GRU_LAUNCH(big_smem, dim3(3), dim3(128), 64 * 1024, nullptr, size_t(64 * 1024), ok.data());
  expect(ok[0] && ok[1] && ok[2], "64 KB of shared memory after opting in");

  // The block order: a permutation, a function of (seed, launch), different for others.
  const auto a = gru_emu::block_order(7, 0, 50), b = gru_emu::block_order(7, 0, 50);
  const auto c = gru_emu::block_order(8, 0, 50), d = gru_emu::block_order(7, 1, 50);
  std::vector<int> seen(50, 0);
  for (unsigned x : a) ++seen[x];
  bool perm = true;
  for (int s : seen) perm = perm && s == 1;
  expect(perm, "block_order is a permutation");
  expect(a == b, "block_order is deterministic");
  expect(a != c && a != d, "block_order changes with the seed and the launch");
}

void run(const std::string& mode) {
  std::vector<int> out(1024, 0);
  if (mode == "clean") {
    clean();
  } else if (mode == "divergent_site") {
    GRU_LAUNCH(divergent_site, dim3(2), dim3(32), 0, nullptr, out.data());
  } else if (mode == "early_return") {
    GRU_LAUNCH(early_return, dim3(2), dim3(32), 0, nullptr, out.data());
  } else if (mode == "uneven_loop") {
    GRU_LAUNCH(uneven_loop, dim3(2), dim3(32), 0, nullptr, out.data());
  } else if (mode == "missing_barrier") {
    GRU_LAUNCH(missing_barrier, dim3(2), dim3(32), 32 * sizeof(int), nullptr, out.data());
  } else if (mode == "stack_overflow") {
    GRU_LAUNCH(stack_overflow, dim3(2), dim3(32), 0, nullptr, out.data(), int(out.size() / 256));
  } else if (mode == "cross_block_race") {
    GRU_LAUNCH(cross_block_race, dim3(2), dim3(32), 0, nullptr, out.data());
  } else if (mode == "smem_over_default") {
    GRU_LAUNCH(noop, dim3(1), dim3(32), gru_emu::kDefaultSmemBytes + 1, nullptr, out.data());
  } else if (mode == "smem_over_opt_in") {
    GRU_SET_MAX_DYNAMIC_SMEM(noop, 100 * 1024);
    GRU_LAUNCH(noop, dim3(1), dim3(32), 100 * 1024, nullptr, out.data());  // fine
    GRU_LAUNCH(noop, dim3(1), dim3(32), 100 * 1024 + 1, nullptr, out.data());
  } else if (mode == "opt_in_too_big") {
    GRU_SET_MAX_DYNAMIC_SMEM(noop, gru_emu::kMaxOptInSmemBytes);  // fine
    GRU_SET_MAX_DYNAMIC_SMEM(noop, gru_emu::kMaxOptInSmemBytes + 1);
  } else if (mode == "block_too_big") {
    GRU_LAUNCH(noop, dim3(1), dim3(1025), 0, nullptr, out.data());
  }
}

const char* const kModes[] = {"clean", "divergent_site", "early_return", "uneven_loop",
                              "missing_barrier", "stack_overflow", "cross_block_race", "smem_over_default", "smem_over_opt_in",
                              "opt_in_too_big", "block_too_big"};

}  // namespace

int main(int argc, char** argv) {
  bool known = false;
  for (const char* m : kModes) known = known || (argc == 2 && std::strcmp(argv[1], m) == 0);
  if (!known) {
    std::fprintf(stderr, "usage: %s MODE (see the top of emu_selftest.cpp)\n", argv[0]);
    return 2;
  }
  try {
    run(argv[1]);
  } catch (const std::exception& e) {
    std::printf("launch failed: %s\n", e.what());
    return 3;
  }
  std::printf("emu_selftest %s: %d failures\n", argv[1], failures);
  return failures == 0 ? 0 : 1;
}
