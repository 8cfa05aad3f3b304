// The emulation layer's own detectors, proven on toy kernels, independent of the GRU
// kernels. tests/test_emulation.py builds this with g++ -DGRU_EMULATE_CUDA, once with
// -fsanitize=thread and once with -fsanitize=address, and runs it once per mode (argv[1]):
//   clean             barriers in uniform code, a thread returning after the last
//                     barrier, 64 KB of shared memory after opting in, the seeded block
//                     order; clusters exchanging values through DSMEM, a cooperative
//                     grid exchanging through global memory, launches refused for
//                     co-residency (running nothing), occupancy, device properties,
//                     launch counts: must pass, both sanitizers silent;
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
//   block_too_big     a block of 1025 threads: must fail;
//   missing_cluster_sync   DSMEM writes read by the peer without a cluster barrier:
//                          ThreadSanitizer must report a data race;
//   missing_grid_sync      global writes read by another block of a cooperative launch
//                          without a grid barrier: ThreadSanitizer must report a data race;
//   dsmem_rank_out_of_range     map_shared_rank to rank 4 of a cluster of 4: must fail;
//   dsmem_before_cluster_sync   map_shared_rank before the first cluster barrier: must fail;
//   dsmem_peer_exited           map_shared_rank to a block that has returned: must fail;
//   dsmem_after_peer_exit       a write through a pointer mapped before the peer returned:
//                               AddressSanitizer must report it (shared memory poisoned);
//   cluster_peer_exited   a block returns while its cluster waits at a cluster barrier:
//                         must fail (not hang);
//   cluster_peer_failed   a block fails (divergent __syncthreads) while its cluster waits:
//                         the launch reports that failure, not the peers' aborted waits;
//   cluster_sync_lines    the blocks of a cluster at two different cluster barriers: must fail;
//   mixed_barriers        __syncthreads and a cluster barrier in one generation: must fail;
//   watchdog              a block sleeps 3 s before its cluster barrier, with
//                         GRU_EMU_WATCHDOG_S=1: must fail as a deadlock;
//   grid_sync_outside_cooperative   GRU_GRID_SYNC in a plain launch: must fail;
//   cluster_too_big            a cluster of 16 blocks: must fail;
//   cluster_grid_not_multiple  grid.x = 6 in clusters of 4: must fail.
// A launch that fails throws std::runtime_error / std::invalid_argument; this program
// prints "launch failed: <message>" and exits with 3, or with 0 when everything passed.
// Every mode runs on the same emulated device (compute capability 9.0, 16 SMs), whatever
// the environment.
#include <chrono>
#include <cstdio>
#include <cstdlib>
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

// --- clusters and cooperative grids ------------------------------------------------------

// What thread t of block (x, y) contributes in round k of the exchanges below.
int exchange_value(unsigned x, unsigned y, int k, unsigned t) {
  return int(x * 7 + y * 131 + t) + k * 1000;
}

// Clusters of `size` blocks along x exchange values through DSMEM. Shared memory:
// int [2][size][blockDim.x], double-buffered by round. In round k every thread writes
// its value to slot [rank][t] of buffer k % 2 of every block of its cluster, then, after
// the cluster barrier (unless `sync` is false: the planted fault), sums slots [*][t] of
// its own buffer into out[k][y][x][t]. A peer's buffer k % 2 is free again in round k + 2:
// its reads of round k ended before round k + 1's barrier.
__global__ void cluster_exchange(unsigned size, int rounds, bool sync, int* out) {
  GRU_DYNAMIC_SMEM(int, s);
  const unsigned n = blockDim.x, t = threadIdx.x, rank = gru_cluster_rank();
  GRU_CLUSTER_SYNC();  // every block of the cluster has started: its memory may be mapped
  for (int k = 0; k < rounds; ++k) {
    int* buf = s + (k % 2) * size * n;
    const int v = exchange_value(blockIdx.x, blockIdx.y, k, t);
    for (unsigned p = 0; p < size; ++p) gru_map_shared_rank(buf, p)[rank * n + t] = v;
    if (sync) GRU_CLUSTER_SYNC();
    int sum = 0;
    for (unsigned p = 0; p < size; ++p) sum += buf[p * n + t];
    out[((k * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * n + t] = sum;
  }
  GRU_CLUSTER_SYNC();  // no block returns while a peer may still write its memory
}

// The blocks of a cooperative launch (grid along x) exchange values through global
// memory, double-buffered: buf int [2][gridDim.x][blockDim.x]. In round k every thread
// writes its value to buf[k % 2][block][t], then, after the grid barrier (unless `sync`
// is false: the planted fault), copies the next block's into out[k][block][t].
__global__ void grid_exchange(int rounds, bool sync, int* buf, int* out) {
  const unsigned n = blockDim.x, t = threadIdx.x, b = blockIdx.x, blocks = gridDim.x;
  for (int k = 0; k < rounds; ++k) {
    int* slice = buf + (k % 2) * blocks * n;
    slice[b * n + t] = exchange_value(b, 0, k, t);
    if (sync) GRU_GRID_SYNC();
    out[(k * blocks + b) * n + t] = slice[((b + 1) % blocks) * n + t];
  }
}

// Maps rank `rank` of the cluster (before the first cluster barrier if `early`).
__global__ void map_rank(unsigned rank, bool early) {
  GRU_DYNAMIC_SMEM(int, s);
  if (!early) GRU_CLUSTER_SYNC();
  gru_map_shared_rank(s, rank)[threadIdx.x] = 1;
  GRU_CLUSTER_SYNC();
}

// Clusters of 2: block 0's thread 0 maps block 1's shared memory, unless `map_late`,
// before the second cluster barrier, after which block 1 returns; 200 ms later it maps
// it (`map_late`) and writes through the pointer.
__global__ void peer_exits(bool map_late) {
  GRU_DYNAMIC_SMEM(int, s);
  GRU_CLUSTER_SYNC();
  const bool mapper = gru_cluster_rank() == 0 && threadIdx.x == 0;
  int* peer = mapper && !map_late ? gru_map_shared_rank(s, 1) : nullptr;
  GRU_CLUSTER_SYNC();
  if (!mapper) return;
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  if (map_late) peer = gru_map_shared_rank(s, 1);
  peer[0] = 1;
}

// Block rank 0 returns instead of reaching the cluster barrier.
__global__ void cluster_early_return(int* out) {
  if (gru_cluster_rank() == 0) return;
  GRU_CLUSTER_SYNC();
  out[blockIdx.x] = 1;
}

// Block rank 0 fails (part of it returns before a __syncthreads) while the others wait
// at the cluster barrier.
__global__ void cluster_peer_failed(int* out) {
  if (gru_cluster_rank() == 0) {
    if (threadIdx.x >= 16) return;
    __syncthreads();
  }
  GRU_CLUSTER_SYNC();
  out[blockIdx.x] = 1;
}

// Block rank 0 waits at one cluster barrier, the others at another.
__global__ void cluster_sync_lines(int* out) {
  if (gru_cluster_rank() == 0) {
    GRU_CLUSTER_SYNC();
  } else {
    GRU_CLUSTER_SYNC();
  }
  out[blockIdx.x] = 1;
}

// Half the block at __syncthreads, half at the cluster barrier.
__global__ void mixed_barriers(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    GRU_CLUSTER_SYNC();
  }
  out[blockIdx.x] = 1;
}

// Block rank 1's thread 0 sleeps 3 s before the cluster barrier.
__global__ void slow_peer(int* out) {
  if (gru_cluster_rank() == 1 && threadIdx.x == 0) {
    std::this_thread::sleep_for(std::chrono::seconds(3));
  }
  GRU_CLUSTER_SYNC();
  out[blockIdx.x] = 1;
}

int failures = 0;
void expect(bool ok, const char* what) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

// Sets an environment variable (the emulator reads its own at every use) for a scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() { had_ ? setenv(name_, old_.c_str(), 1) : unsetenv(name_); }

 private:
  const char* name_;
  std::string old_;
  bool had_ = false;
};

template <typename Error, typename F>
void expect_throw(F f, const char* text, const char* what) {
  try {
    f();
  } catch (const Error& e) {
    expect(std::strstr(e.what(), text) != nullptr, what);
    return;
  }
  expect(false, what);
}

uint64_t count_of(const char* kernel) {
  const auto counts = gru_emu::launch_counts();
  const auto it = counts.find(kernel);
  return it == counts.end() ? 0 : it->second;
}

// Clusters of `size` in a grid (2 size, 2): 4 clusters, two rows of them, 3 rounds, two
// seeds.
void clean_clusters(unsigned size) {
  const unsigned n = 32;
  const dim3 grid(2 * size, 2);
  const int rounds = 3;
  const size_t smem = 2 * size * n * sizeof(int);
  std::vector<int> out(size_t(rounds) * grid.x * grid.y * n);
  for (uint64_t seed : {1, 2}) {
    gru_emu::set_seed(seed);
    out.assign(out.size(), -1);
    const bool ran = GRU_LAUNCH_CLUSTER(cluster_exchange, grid, dim3(n), smem, size, nullptr,
                                        size, rounds, true, out.data());
    expect(ran, "cluster launch runs");
    bool right = true;
    for (int k = 0; k < rounds; ++k) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          for (unsigned t = 0; t < n; ++t) {
            const unsigned first = x / size * size;  // rank 0 of the block's cluster
            int want = 0;
            for (unsigned p = 0; p < size; ++p) want += exchange_value(first + p, y, k, t);
            right = right && out[((k * grid.y + y) * grid.x + x) * n + t] == want;
          }
        }
      }
    }
    expect(right, "cluster_exchange sums its cluster's values");
  }
  gru_emu::clear_seed();
}

// A cooperative grid of 8 blocks, 3 rounds.
void clean_cooperative() {
  const unsigned blocks = 8, n = 32;
  const int rounds = 3;
  std::vector<int> buf(2 * blocks * n, -1), out(rounds * blocks * n, -1);
  const bool ran = GRU_LAUNCH_COOPERATIVE(grid_exchange, dim3(blocks), dim3(n), 0, nullptr,
                                          rounds, true, buf.data(), out.data());
  expect(ran, "cooperative launch runs");
  bool right = true;
  for (int k = 0; k < rounds; ++k) {
    for (unsigned b = 0; b < blocks; ++b) {
      for (unsigned t = 0; t < n; ++t) {
        right = right && out[(k * blocks + b) * n + t] == exchange_value((b + 1) % blocks, 0, k, t);
      }
    }
  }
  expect(right, "grid_exchange reads the next block's values");
}

// Launches a device cannot make co-resident return false and run nothing.
void clean_refusals() {
  std::vector<int> buf(2 * 65 * 32, -1), out(65 * 32, -1);
  {
    // 2 SMs of 32 blocks of 32 threads: 64 blocks at most.
    ScopedEnv sms("GRU_EMU_SM_COUNT", "2");
    const bool ran = GRU_LAUNCH_COOPERATIVE(grid_exchange, dim3(65), dim3(32), 0, nullptr, 1,
                                            true, buf.data(), out.data());
    expect(!ran, "a cooperative grid over sm_count * blocks per SM is refused");
  }
  {
    // 227 KB per block: one block per SM, so a cluster of 8 needs 8 of the 4 SMs.
    ScopedEnv sms("GRU_EMU_SM_COUNT", "4");
    GRU_SET_MAX_DYNAMIC_SMEM(cluster_exchange, gru_emu::kMaxOptInSmemBytes);
    expect(gru_max_active_clusters(cluster_exchange, dim3(8), dim3(32),
                                   gru_emu::kMaxOptInSmemBytes, 8) == 0,
           "no cluster of 8 one-block-per-SM blocks on 4 SMs");
    expect(gru_max_active_clusters(cluster_exchange, dim3(8), dim3(32),
                                   gru_emu::kMaxOptInSmemBytes, 4) == 1,
           "one cluster of 4 one-block-per-SM blocks on 4 SMs");
    const bool ran = GRU_LAUNCH_CLUSTER(cluster_exchange, dim3(8), dim3(32),
                                        gru_emu::kMaxOptInSmemBytes, 8, nullptr, 8u, 1, true,
                                        out.data());
    expect(!ran, "a cluster that cannot be co-scheduled is refused");
  }
  bool untouched = true;
  for (int v : out) untouched = untouched && v == -1;
  for (int v : buf) untouched = untouched && v == -1;
  expect(untouched, "refused launches run nothing");
}

// The fields gru_emu::device_props fills (the planner's struct has these).
struct DeviceProps {
  int cc_major = 0, cc_minor = 0;
  int sm_count = 0;
  size_t smem_per_block_optin = 0;
  size_t smem_per_sm = 0;
  bool cooperative = false;
  bool clusters = false;
};

// The emulated device: occupancy, properties, and clusters only from 9.0.
void clean_device() {
  using gru_emu::kDefaultSmemBytes;
  expect(gru_max_active_blocks_per_sm(noop, 256, 0) == 8, "2048 threads per SM");
  expect(gru_max_active_blocks_per_sm(noop, 32, 0) == 32, "32 blocks per SM");
  expect(gru_max_active_blocks_per_sm(noop, 128, kDefaultSmemBytes) == 4,
         "228 KB of shared memory per SM, 1 KB reserved per block");
  expect(gru_max_active_blocks_per_sm(noop, 128, kDefaultSmemBytes + 1) == 0,
         "no block over the kernel's shared memory limit");
  expect(gru_max_active_blocks_per_sm(big_smem, 128, 64 * 1024) == 3, "opted-in shared memory");
  expect(gru_max_active_clusters(noop, dim3(16), dim3(128), kDefaultSmemBytes, 4) == 16,
         "16 SMs of 4 blocks: 16 clusters of 4");
  expect(gru_max_active_clusters(noop, dim3(16), dim3(128), kDefaultSmemBytes, 16) == 0,
         "no cluster of 16 (non-portable) without the kernel's opt-in");
  GRU_ALLOW_NON_PORTABLE_CLUSTER(big_smem);
  expect(gru_max_active_clusters(big_smem, dim3(16), dim3(128), 64 * 1024, 16) == 3,
         "48 blocks of 64 KB on 16 SMs: 3 clusters of 16 after the opt-in");
  {
    ScopedEnv gpcs("GRU_EMU_MAX_CLUSTER", "8");
    expect(gru_max_active_clusters(big_smem, dim3(16), dim3(128), 64 * 1024, 16) == 0 &&
               gru_max_active_clusters(big_smem, dim3(8), dim3(128), 64 * 1024, 8) == 6,
           "GRU_EMU_MAX_CLUSTER=8: no room for a cluster of 16, room for 8");
  }

  const DeviceProps d = gru_emu::device_props<DeviceProps>();
  expect(d.cc_major == 9 && d.cc_minor == 0 && d.sm_count == 16 && d.cooperative &&
             d.clusters && d.smem_per_block_optin == 227 * 1024 && d.smem_per_sm == 228 * 1024,
         "the default emulated device");
  {
    ScopedEnv cap("GRU_EMU_MAX_BLOCKS_PER_SM", "2");
    expect(gru_max_active_blocks_per_sm(noop, 32, 0) == 2 &&
               gru_max_active_clusters(noop, dim3(16), dim3(128), 0, 8) == 4,
           "GRU_EMU_MAX_BLOCKS_PER_SM=2 caps blocks per SM");
  }
  {
    ScopedEnv none("GRU_EMU_MAX_BLOCKS_PER_SM", "0");
    std::vector<int> out(64, -1);
    expect(!GRU_LAUNCH_CLUSTER(cluster_exchange, dim3(2), dim3(32), 2 * 2 * 32 * sizeof(int), 2,
                               nullptr, 2u, 1, true, out.data()),
           "GRU_EMU_MAX_BLOCKS_PER_SM=0: a cluster launch is refused, not run");
  }
  ScopedEnv cc("GRU_EMU_CC", "8.6");
  const DeviceProps ampere = gru_emu::device_props<DeviceProps>();
  expect(ampere.cc_major == 8 && ampere.cc_minor == 6 && !ampere.clusters, "GRU_EMU_CC=8.6");
  std::vector<int> out(64, -1);
  expect_throw<std::invalid_argument>(
      [&] {
        GRU_LAUNCH_CLUSTER(cluster_exchange, dim3(2), dim3(32), 2 * 2 * 32 * sizeof(int), 2,
                           nullptr, 2u, 1, true, out.data());
      },
      "clusters need 9.0", "no cluster launch below compute capability 9.0");
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

  gru_emu::reset_launch_counts();
  clean_clusters(4);
  // A non-portable cluster of 16: only after the kernel's opt-in.
  GRU_ALLOW_NON_PORTABLE_CLUSTER(cluster_exchange);
  clean_clusters(16);
  clean_cooperative();
  clean_refusals();
  clean_device();
  expect(count_of("cluster_exchange") == 4 && count_of("grid_exchange") == 1 &&
             gru_emu::launch_counts().size() == 2,
         "launch_counts: the launches that ran, per kernel");
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
  } else if (mode == "missing_cluster_sync") {
    GRU_LAUNCH_CLUSTER(cluster_exchange, dim3(4), dim3(32), 2 * 4 * 32 * sizeof(int), 4,
                       nullptr, 4u, 1, false, out.data());
  } else if (mode == "missing_grid_sync") {
    std::vector<int> buf(2 * 4 * 32);
    GRU_LAUNCH_COOPERATIVE(grid_exchange, dim3(4), dim3(32), 0, nullptr, 1, false, buf.data(),
                           out.data());
  } else if (mode == "dsmem_rank_out_of_range") {
    GRU_LAUNCH_CLUSTER(map_rank, dim3(4), dim3(32), 32 * sizeof(int), 4, nullptr, 4u, false);
  } else if (mode == "dsmem_before_cluster_sync") {
    GRU_LAUNCH_CLUSTER(map_rank, dim3(4), dim3(32), 32 * sizeof(int), 4, nullptr, 1u, true);
  } else if (mode == "dsmem_peer_exited") {
    GRU_LAUNCH_CLUSTER(peer_exits, dim3(2), dim3(32), 32 * sizeof(int), 2, nullptr, true);
  } else if (mode == "dsmem_after_peer_exit") {
    GRU_LAUNCH_CLUSTER(peer_exits, dim3(2), dim3(32), 32 * sizeof(int), 2, nullptr, false);
  } else if (mode == "cluster_peer_exited") {
    GRU_LAUNCH_CLUSTER(cluster_early_return, dim3(4), dim3(32), 0, 4, nullptr, out.data());
  } else if (mode == "cluster_peer_failed") {
    GRU_LAUNCH_CLUSTER(cluster_peer_failed, dim3(4), dim3(32), 0, 4, nullptr, out.data());
  } else if (mode == "cluster_sync_lines") {
    GRU_LAUNCH_CLUSTER(cluster_sync_lines, dim3(4), dim3(32), 0, 4, nullptr, out.data());
  } else if (mode == "mixed_barriers") {
    GRU_LAUNCH(mixed_barriers, dim3(2), dim3(32), 0, nullptr, out.data());
  } else if (mode == "watchdog") {
    setenv("GRU_EMU_WATCHDOG_S", "1", 1);
    GRU_LAUNCH_CLUSTER(slow_peer, dim3(2), dim3(32), 0, 2, nullptr, out.data());
  } else if (mode == "grid_sync_outside_cooperative") {
    std::vector<int> buf(2 * 4 * 32);
    GRU_LAUNCH(grid_exchange, dim3(4), dim3(32), 0, nullptr, 1, true, buf.data(), out.data());
  } else if (mode == "cluster_too_big") {
    GRU_LAUNCH_CLUSTER(noop, dim3(16), dim3(32), 0, 16, nullptr, out.data());
  } else if (mode == "cluster_grid_not_multiple") {
    GRU_LAUNCH_CLUSTER(noop, dim3(6), dim3(32), 0, 4, nullptr, out.data());
  }
}

const char* const kModes[] = {
    "clean", "divergent_site", "early_return", "uneven_loop", "missing_barrier",
    "stack_overflow", "cross_block_race", "smem_over_default", "smem_over_opt_in",
    "opt_in_too_big", "block_too_big", "missing_cluster_sync", "missing_grid_sync",
    "dsmem_rank_out_of_range", "dsmem_before_cluster_sync", "dsmem_peer_exited",
    "dsmem_after_peer_exit", "cluster_peer_exited", "cluster_peer_failed",
    "cluster_sync_lines", "mixed_barriers", "watchdog", "grid_sync_outside_cooperative",
    "cluster_too_big", "cluster_grid_not_multiple"};

}  // namespace

int main(int argc, char** argv) {
  bool known = false;
  for (const char* m : kModes) known = known || (argc == 2 && std::strcmp(argv[1], m) == 0);
  if (!known) {
    std::fprintf(stderr, "usage: %s MODE (see the top of emu_selftest.cpp)\n", argv[0]);
    return 2;
  }
  // The same emulated device in every mode, whatever the environment.
  setenv("GRU_EMU_CC", "9.0", 1);
  setenv("GRU_EMU_SM_COUNT", "16", 1);
  unsetenv("GRU_EMU_WATCHDOG_S");
  unsetenv("GRU_EMU_MAX_BLOCKS_PER_SM");
  unsetenv("GRU_EMU_MAX_CLUSTER");
  try {
    run(argv[1]);
  } catch (const std::exception& e) {
    std::printf("launch failed: %s\n", e.what());
    return 3;
  }
  std::printf("emu_selftest %s: %d failures\n", argv[1], failures);
  return failures == 0 ? 0 : 1;
}
