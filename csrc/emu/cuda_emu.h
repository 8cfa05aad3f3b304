// A small CUDA emulation layer: runs the project's CUDA kernels on the CPU, so that the
// test suite executes them on machines without a GPU, under AddressSanitizer and
// ThreadSanitizer too. Selected by -DGRU_EMULATE_CUDA through cuda/cuda_compat.h.
// Linux only (ucontext fibers, futexes).
//
// Supported (and all the kernels may use): __global__/__device__/__host__ functions,
// __forceinline__, __restrict__, __launch_bounds__ (accepted, ignored), threadIdx /
// blockIdx / blockDim / gridDim, __syncthreads(), per-block dynamic shared memory
// (GRU_DYNAMIC_SMEM), its opt-in limit (GRU_SET_MAX_DYNAMIC_SMEM) and launches through
// GRU_LAUNCH. For the persistent kernels: thread-block clusters along x of up to 8
// blocks (GRU_LAUNCH_CLUSTER), their barrier (GRU_CLUSTER_SYNC) and distributed shared
// memory (gru_cluster_rank, gru_map_shared_rank); cooperative launches
// (GRU_LAUNCH_COOPERATIVE) and their grid barrier (GRU_GRID_SYNC); the occupancy API
// (gru_max_active_blocks_per_sm, gru_max_active_clusters) and device properties
// (gru_device_props) of an emulated device, which refuses clusters and cooperative
// grids it could not make co-resident. No warp intrinsics, no static __shared__
// arrays, no atomics: the kernels do not use them.
//
// Model:
// - Device: compute capability GRU_EMU_CC ("major.minor", default 9.0; clusters from
//   9.0), GRU_EMU_SM_COUNT SMs (default 16), 228 KB of shared memory per SM and up to
//   227 KB per block, 2048 threads and 32 blocks per SM; both variables are read at
//   every use. Occupancy: blocks per SM = min(2048 / threads, 32, 228 KB / (smem +
//   1 KB)), 0 when smem is over what the kernel may have. A cluster launch runs only
//   if max_active_clusters() > 0 and a cooperative one only if its blocks fit
//   sm_count * blocks per SM at once; otherwise they return false and run nothing, as
//   a GPU refuses them.
// - Blocks: the blocks of a launch run in waves of 2 to 16 blocks (up to
//   GRU_EMU_WAVE_THREADS CUDA threads per wave: default 4096, 1024 under
//   ThreadSanitizer), each block of a wave on its own OS thread, all at once. The block
//   order is a permutation drawn from a seed (GRU_EMU_SEED, or set_seed()) and the
//   launch's number. Nothing synchronises two blocks of a wave (see WorkerPool), so
//   ThreadSanitizer reports a race between blocks as it does one between threads, and
//   a result that depends on block order changes with the seed. Waves, and consecutive
//   launches, are ordered (stream order). A cluster launch permutes whole clusters and
//   a wave holds whole clusters (at least one, whatever the budget): the blocks of a
//   cluster always run at once. A cooperative launch is one wave of all its blocks.
// - Threads: the CUDA threads of a block are fibers (ucontext, each its own stack) that
//   the block's OS thread runs one at a time, each up to its next barrier or its
//   return, in an order drawn anew from the seed at every barrier. ThreadSanitizer is
//   told about the fibers (__tsan_*_fiber) and that the barriers are the only ordering
//   between them (release on arrival, acquire on leaving), so a missing barrier is a
//   data race it reports. AddressSanitizer is told about the stack switches (and its
//   swapcontext interceptor, which would wipe the redzones of suspended frames, is
//   bypassed).
// - __syncthreads(): a generation completes when every thread of the block waits at the
//   same source line. The launch fails (std::runtime_error naming the line, the block
//   and the threads; never a hang) when a generation is reached from different lines
//   or barriers, or when some threads wait at a barrier that others returned without
//   reaching (undefined on the GPU: a hang or corrupt results). Returning after the
//   last barrier is fine.
// - Cluster and grid barriers (see Group): first as __syncthreads() within each block,
//   then the blocks of the cluster (a block alone outside cluster launches) or of the
//   cooperative grid meet: all at the same source line. A block that returned or
//   failed without reaching the barrier, blocks at different lines, or a wait longer
//   than GRU_EMU_WATCHDOG_S seconds (default 60: "gru_emu: deadlock: ...") fail the
//   launch, and the other blocks' waits with it. For ThreadSanitizer the barrier is a
//   release by every thread of the group on arrival and an acquire on leaving, nothing
//   more, so a missing cluster barrier between a DSMEM write and a peer's read, or a
//   missing grid barrier between blocks, is a data race it reports.
// - Shared memory: a malloc of exactly the launch's size per block, filled with 0xFF
//   bytes (NaN for floats), so overruns hit AddressSanitizer's redzones and reads of
//   unwritten shared memory turn results into NaN. A launch asking for more than 48 KB
//   fails unless the kernel opted in (GRU_SET_MAX_DYNAMIC_SMEM, at most 227 KB as on
//   sm_90). DSMEM: map_shared_rank maps into a cluster peer's allocation, so
//   AddressSanitizer checks every access; mapping fails for a rank outside the
//   cluster, a pointer outside the block's shared memory, before the thread's first
//   cluster barrier (the peer may not have started) and for a peer that has exited;
//   a block's shared memory is poisoned when it ends, so an access through a pointer
//   mapped earlier is reported too.
// - Launch configuration: block of 1..1024 threads (z <= 64), grid y and z <= 65535,
//   cluster of 1..8 blocks along x (the portable sizes; up to 16 for a kernel that
//   allowed non-portable sizes, allow_non_portable_cluster) dividing grid.x.
// - launch_counts(), last_cluster_size(kernel): the launches that ran, per kernel
//   expression, and the cluster size of the last, for the tests.
//
// Not modelled: warps (no lockstep, no warp-synchronous code, no shuffles; threads
// switch only at barriers and are never preempted, so an intra-block race shows in
// values only through the seeded order, though always to ThreadSanitizer, and a thread
// that spins waiting for another thread or block hangs), mma.sync and tensor cores,
// atomics, the GPU memory model beyond happens-before (no caches, no weak ordering, no
// fences, no cluster- or GPU-scope orderings other than the barriers), registers and
// static shared memory in occupancy (a GPU may fit fewer blocks than the emulated
// device: __launch_bounds__ is ignored), the GPCs (a GPU holds clusters of 16 only in
// GPCs of 16 SMs or more; the emulator, anywhere) and clusters along y or z, races between blocks of different waves, timing, and device floating point
// (FMA contraction, fast intrinsics). Under ThreadSanitizer a wave may have about 8000
// CUDA threads at most (its limit on threads and fibers).
#pragma once

#include <sys/mman.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Occupancy hints for nvcc; the emulator only checks the block size at launch.
#define __launch_bounds__(...)
// __restrict__ is a g++/clang keyword already (an aliasing promise, no effect here).

#if defined(__SANITIZE_THREAD__)
#define GRU_EMU_TSAN 1
#elif defined(__SANITIZE_ADDRESS__)
#define GRU_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define GRU_EMU_TSAN 1
#elif __has_feature(address_sanitizer)
#define GRU_EMU_ASAN 1
#endif
#endif

#if defined(GRU_EMU_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#elif defined(GRU_EMU_ASAN)
#include <dlfcn.h>
#include <sanitizer/asan_interface.h>
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old,
                                     size_t* size_old);
}
#endif

namespace gru_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using stream_t = void*;

// Shared memory per block: the default, and the most a kernel may opt in to (sm_90).
constexpr size_t kDefaultSmemBytes = 48 * 1024;
constexpr size_t kMaxOptInSmemBytes = 227 * 1024;
// The emulated SM (sm_90): what bounds the blocks it holds at once. Registers are not
// modelled.
constexpr size_t kSmemPerSm = 228 * 1024;
constexpr size_t kSmemReservedPerBlock = 1024;  // by the system, for every block
constexpr unsigned kMaxThreadsPerSm = 2048;
constexpr unsigned kMaxBlocksPerSm = 32;
// The largest portable cluster, and the largest a kernel that allowed non-portable sizes
// (GRU_ALLOW_NON_PORTABLE_CLUSTER, cudaFuncAttributeNonPortableClusterSizeAllowed) may
// have on sm_90.
constexpr unsigned kMaxClusterBlocks = 8;
constexpr unsigned kMaxNonPortableClusterBlocks = 16;

// Where a launch comes from: the kernel expression as written and the GRU_LAUNCH line.
struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
};

inline std::string to_string(dim3 d) {
  return "(" + std::to_string(d.x) + "," + std::to_string(d.y) + "," + std::to_string(d.z) + ")";
}

inline dim3 unflatten(unsigned id, dim3 shape) {
  return dim3(id % shape.x, (id / shape.x) % shape.y, id / (shape.x * shape.y));
}

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline uint64_t hash64(uint64_t x) { return splitmix64(x); }

// Fisher-Yates with splitmix64: the same permutation on every platform.
inline void shuffle(std::vector<unsigned>& v, uint64_t& state) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix64(state) % i]);
}

// --- futex words: how OS threads wait for each other ----------------------------------

// A 32-bit word that threads sleep on until it changes. The waits and wake-ups are
// invisible to the sanitizers; the acquire load that sees the new value and the
// release store that wrote it are the happens-before edge they see.
class WaitWord {
 public:
  using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as FUTEX_WAIT's timeout

  uint32_t load() const { return v_.load(std::memory_order_acquire); }

  // Returns the first value seen that differs from old.
  uint32_t wait_while(uint32_t old) const {
    uint32_t now;
    while ((now = load()) == old) {
      syscall(SYS_futex, &v_, FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
    }
    return now;
  }

  // As wait_while, giving up at `deadline`: false if the word still holds old then.
  bool wait_while(uint32_t old, Clock::time_point deadline) const {
    while (load() == old) {
      const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(deadline - Clock::now());
      if (left.count() <= 0) return false;
      const timespec timeout = {static_cast<time_t>(left.count() / 1000000000),
                                static_cast<long>(left.count() % 1000000000)};
      syscall(SYS_futex, &v_, FUTEX_WAIT_PRIVATE, old, &timeout, nullptr, 0);
    }
    return true;
  }

  void wait_until(uint32_t want) const {
    for (uint32_t now = load(); now != want;) now = wait_while(now);
  }

  void store_and_wake_all(uint32_t x) {
    v_.store(x, std::memory_order_release);
    syscall(SYS_futex, &v_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
  }

 private:
  mutable std::atomic<uint32_t> v_{0};
};
static_assert(sizeof(std::atomic<uint32_t>) == 4 && std::atomic<uint32_t>::is_always_lock_free,
              "a futex is a plain 32-bit word");

// --- fibers: the CUDA threads of a block -----------------------------------------------

#if defined(GRU_EMU_ASAN)
// AddressSanitizer's swapcontext interceptor clears the shadow of the whole target
// stack at every switch, which would erase the redzones of kernel frames suspended at
// a barrier (and cost a 32 KB memset per switch). The fiber annotations tell it all it
// needs, so call libc's swapcontext directly.
inline int switch_context(ucontext_t* from, ucontext_t* to) {
  using Fn = int (*)(ucontext_t*, const ucontext_t*);
  static const Fn real = [] {
    void* libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    void* fn = libc ? dlsym(libc, "swapcontext") : nullptr;
    if (fn == nullptr) {
      std::fprintf(stderr, "gru_emu: libc's swapcontext not found\n");
      std::abort();
    }
    return reinterpret_cast<Fn>(fn);
  }();
  return real(from, to);
}
#else
inline int switch_context(ucontext_t* from, ucontext_t* to) { return swapcontext(from, to); }
#endif

// A stack and a context; kept for the process and reused by later launches.
struct Fiber {
  static constexpr size_t kStackBytes = 256 * 1024;  // sanitizers' frames are large

  Fiber() {
    // A guard page below the stack: an overflow faults instead of corrupting a neighbour.
    mem_ = static_cast<char*>(mmap(nullptr, kStackBytes + kGuard, PROT_READ | PROT_WRITE,
                                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK,
                                   -1, 0));
    if (mem_ == MAP_FAILED) throw std::bad_alloc();
    mprotect(mem_, kGuard, PROT_NONE);
    stack = mem_ + kGuard;
    getcontext(&ctx);
#if defined(GRU_EMU_TSAN)
    tsan = __tsan_create_fiber(0);
#endif
  }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  ucontext_t ctx;
  char* stack;
  void* tsan = nullptr;

 private:
  static constexpr size_t kGuard = 4096;
  char* mem_;
};

// The barriers a thread can wait at: its block's, its cluster's, its grid's.
enum Barrier : uint8_t { kBlockBarrier, kClusterBarrier, kGridBarrier };

inline const char* barrier_name(uint8_t kind) {
  static const char* const names[] = {"__syncthreads()", "cluster barrier", "grid barrier"};
  return names[kind];
}

struct BlockRun;
class Group;

// One CUDA thread: what the kernel reads through the CUDA names, and its progress.
// Fields the fiber writes and its scheduler reads (no happens-before between them, as
// far as ThreadSanitizer is told) are relaxed atomics.
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned char* smem = nullptr;
  BlockRun* run = nullptr;
  Fiber* fiber = nullptr;

  enum Status : uint8_t { kRunning, kWaiting, kExited, kAborted, kThrew };
  std::atomic<uint8_t> status{kRunning};
  std::atomic<uint8_t> barrier{kBlockBarrier};  // the barrier it waits at: kind, line
  std::atomic<const char*> file{nullptr};
  std::atomic<int> line{0};
  std::atomic<bool> abort{false};               // set by the scheduler: unwind at the barrier
  unsigned passed[3] = {0, 0, 0};               // generations passed, per Barrier kind
  std::string error;                            // kThrew: the failure, whole; read after done_sync
  bool consequence = false;                     // kThrew: error only follows a peer's failure
#if defined(GRU_EMU_ASAN)
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
#endif
};

// The thread the calling fiber plays (set by its scheduler before each switch to it).
inline thread_local std::atomic<ThreadState*> current_thread{nullptr};

inline ThreadState& current() {
  ThreadState* t = current_thread.load(std::memory_order_relaxed);
  if (t == nullptr) throw std::logic_error("gru_emu: a CUDA builtin used outside a kernel");
  return *t;
}

// Thrown inside a thread of a failed block to unwind its kernel; never leaves the fiber.
struct BlockAborted {};

// Thrown in a thread that misuses the emulated device API (DSMEM, the grid barrier);
// its message is the launch's failure as it stands.
struct DeviceError : std::logic_error {
  using std::logic_error::logic_error;
};

[[noreturn]] inline void device_error(const ThreadState& t, const std::string& what) {
  throw DeviceError("gru_emu: " + what + " (thread " + to_string(t.thread_idx) + " in block " +
                    to_string(t.block_idx) + ")");
}

// One block of a wave, run by one OS thread (run_block).
struct BlockRun {
  dim3 idx;
  ThreadState* threads = nullptr;  // [nthreads]
  unsigned nthreads = 0;
  const std::function<void()>* kernel = nullptr;  // the kernel with the launch's arguments
  uint64_t order_state = 0;                       // seeds the threads' order per generation
  unsigned char* smem = nullptr;                  // its dynamic shared memory: smem_bytes
  size_t smem_bytes = 0;
  // Its cluster (the block alone outside cluster launches) and, in a cooperative
  // launch, its grid (else null), with its rank in each.
  Group* cluster = nullptr;
  unsigned cluster_rank = 0;
  Group* grid = nullptr;
  unsigned grid_rank = 0;
  // Set when every thread is done (kEnded, or kEndedFailing: the block failed);
  // cluster peers' map_shared_rank reads it (relaxed: it orders nothing).
  enum End : uint8_t { kNotEnded, kEnded, kEndedFailing };
  std::atomic<uint8_t> ended{kNotEnded};
  std::string failure;       // empty: the block ran fine
  bool peer_failed = false;  // failure only says that a block of its cluster or grid failed
  // The scheduler's context, while a fiber of this block runs.
  ucontext_t sched_ctx{};
  void* sched_tsan = nullptr;
  // Addresses for ThreadSanitizer: __syncthreads() (release on arrival, acquire on
  // leaving) and the end of the block (each thread releases, the scheduler acquires).
  // Two for the barrier, by the parity of the generation: a thread leaving generation g
  // must not acquire what others released on arriving at g + 1 (after their writes
  // since g), and everyone has left g - 1 before anyone arrives at g + 1.
  char barrier_sync[2] = {0, 0}, done_sync = 0;
  char start_sync = 0;  // released by the scheduler once set up, acquired by each thread
};

// --- groups: the blocks that meet at cluster and grid barriers --------------------------

// The blocks of one cluster of a wave, in rank order, or all the blocks of a
// cooperative launch; a block alone outside cluster launches. Their barrier has two
// levels: a member block first completes a generation of its own threads, all waiting
// at the group's barrier (run_block, check_generation); then its scheduler calls
// arrive(), which returns once every member arrived at the same source line, or with
// why none ever will: a member returned (leave) or failed, members arrived at
// different lines, or GRU_EMU_WATCHDOG_S expired. Once broken, every wait fails: a
// failure anywhere in the group unwinds the others instead of hanging them.
//
// Happens-before: only the schedulers take mu_. The edges it makes between them never
// reach a fiber: fibers switch without synchronisation, and a scheduler releases to its
// fibers only once, at the start (start_sync). What orders the fibers is sync(g):
// released by every thread of every member on arriving at generation g, acquired on
// leaving it (two addresses by parity, as BlockRun::barrier_sync), which is what the
// GPU's barrier guarantees and no more.
class Group {
 public:
  struct Outcome {
    std::string why;           // "": every member arrived; the generation is complete
    bool peer_failed = false;  // why is only that a member block failed
  };

  // Before each wave, by the launching thread. members: [size] consecutive blocks.
  void reset(Barrier kind, BlockRun* members, unsigned size, std::chrono::seconds watchdog) {
    kind_ = kind;
    members_ = members;
    size_ = size;
    watchdog_ = watchdog;
    const unsigned tracked = size > 1 ? size : 0;  // a block alone never waits
    waiting_at_.assign(tracked, Site{});
    gone_.assign(tracked, kHere);
    arrived_ = 0;
    generation_ = 0;
    broken_.clear();
    broken_by_failure_ = false;
  }

  unsigned size() const { return size_; }
  BlockRun& member(unsigned rank) const { return members_[rank]; }
  char* sync(unsigned generation) { return &sync_[generation % 2]; }

  // Member `rank` waits at the barrier at file:line; blocks until the generation
  // completes or cannot.
  Outcome arrive(unsigned rank, const char* file, int line);
  // Member `rank` has ended (failed: with a failure of its own): it will not arrive again.
  void leave(unsigned rank, bool failed);

 private:
  struct Site {
    const char* file = nullptr;  // null: not waiting
    int line = 0;
  };
  enum Gone : uint8_t { kHere, kExited, kFailed };

  Outcome verdict() const;
  void break_with(Outcome why);
  std::string deadlock(unsigned rank) const;
  std::string blocks(std::vector<unsigned> ranks) const;
  std::string scope() const { return kind_ == kClusterBarrier ? "its cluster" : "the grid"; }

  Barrier kind_ = kClusterBarrier;
  BlockRun* members_ = nullptr;
  unsigned size_ = 0;
  std::chrono::seconds watchdog_{60};
  char sync_[2] = {0, 0};

  std::mutex mu_;                 // guards what follows
  std::vector<Site> waiting_at_;  // [size]: where each member waits in this generation
  std::vector<uint8_t> gone_;     // [size]: Gone
  unsigned arrived_ = 0;
  uint64_t generation_ = 0;       // generations completed
  std::string broken_;            // why every wait fails from now on; "" while none does
  bool broken_by_failure_ = false;
  WaitWord changed_;              // bumped when a generation completes or the group breaks
};

// Fiber -> scheduler: tells ThreadSanitizer nothing is ordered by the switch (the
// scheduler then starts another thread of the block). `release`, if not null, is
// released just before: the last access the fiber makes to memory outside its stack,
// so everything it did is ordered before whoever acquires it.
inline void switch_to_scheduler(ThreadState& t, bool finished, char* release) {
  ucontext_t* const mine = &t.fiber->ctx;
  ucontext_t* const sched = &t.run->sched_ctx;
#if defined(GRU_EMU_TSAN)
  void* const sched_fiber = t.run->sched_tsan;
  (void)finished;
  if (release) __tsan_release(release);
  __tsan_switch_to_fiber(sched_fiber, 1 /* __tsan_switch_to_fiber_no_sync */);
  switch_context(mine, sched);
#elif defined(GRU_EMU_ASAN)
  (void)release;
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, t.sched_stack, t.sched_stack_size);
  switch_context(mine, sched);
  __sanitizer_finish_switch_fiber(fake, &t.sched_stack, &t.sched_stack_size);
#else
  (void)finished;
  (void)release;
  switch_context(mine, sched);
#endif
}

// Scheduler -> fiber: orders nothing either (in ThreadSanitizer's clocks, a switch with
// synchronisation costs as much as a release and an acquire). A fiber acquires the
// block's start_sync when it starts, and a barrier's sync when it leaves it.
inline void switch_to_thread(ThreadState& t) {
  ucontext_t* const sched = &t.run->sched_ctx;
  Fiber& f = *t.fiber;
  current_thread.store(&t, std::memory_order_relaxed);
#if defined(GRU_EMU_TSAN)
  __tsan_switch_to_fiber(f.tsan, 1 /* __tsan_switch_to_fiber_no_sync */);
  switch_context(sched, &f.ctx);
#elif defined(GRU_EMU_ASAN)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, Fiber::kStackBytes);
  switch_context(sched, &f.ctx);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  switch_context(sched, &f.ctx);
#endif
  current_thread.store(nullptr, std::memory_order_relaxed);
}

// A fiber's entry: makecontext passes its ThreadState* and BlockRun* as 32-bit halves
// (its arguments are ints), so that the acquire below comes before any other access.
inline void fiber_main(unsigned t_hi, unsigned t_lo, unsigned r_hi, unsigned r_lo) {
  ThreadState& t = *reinterpret_cast<ThreadState*>(uintptr_t(t_hi) << 32 | t_lo);
#if defined(GRU_EMU_TSAN)
  BlockRun* const run = reinterpret_cast<BlockRun*>(uintptr_t(r_hi) << 32 | r_lo);
  __tsan_acquire(&run->start_sync);  // the set-up: the host's and the scheduler's writes
#else
  (void)r_hi;
  (void)r_lo;
#endif
#if defined(GRU_EMU_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &t.sched_stack, &t.sched_stack_size);
#endif
  uint8_t status = ThreadState::kExited;
  const auto thrown = [&t](const char* what) {
    return "gru_emu: exception in thread " + to_string(t.thread_idx) + " in block " +
           to_string(t.block_idx) + ": " + what;
  };
  try {
    (*t.run->kernel)();
  } catch (const BlockAborted&) {
    status = ThreadState::kAborted;
  } catch (const DeviceError& e) {
    status = ThreadState::kThrew;
    t.error = e.what();
  } catch (const std::exception& e) {
    status = ThreadState::kThrew;
    t.error = thrown(e.what());
  } catch (...) {
    status = ThreadState::kThrew;
    t.error = thrown("an exception not derived from std::exception");
  }
  t.status.store(status, std::memory_order_relaxed);
  switch_to_scheduler(t, /*finished=*/true, &t.run->done_sync);
  std::abort();  // a finished fiber is never resumed, only restarted (makecontext)
}

// Every barrier: the thread releases the barrier's sync address and waits; its
// scheduler completes the generation (and, for a cluster or grid barrier, meets the
// group's other blocks); then it acquires the address, or unwinds if the block failed.
inline void barrier(Barrier kind, const char* file, int line) {
  ThreadState& t = current();
  BlockRun& r = *t.run;
  const unsigned generation = t.passed[kind]++;
  char* sync = nullptr;
  if (kind == kBlockBarrier) {
    sync = &r.barrier_sync[generation % 2];
  } else if (kind == kClusterBarrier) {
    sync = r.cluster->sync(generation);
  } else if (r.grid != nullptr) {
    sync = r.grid->sync(generation);
  } else {
    device_error(t, "GRU_GRID_SYNC() at " + std::string(file) + ":" + std::to_string(line) +
                        " outside a cooperative launch (undefined on the GPU; launch with "
                        "GRU_LAUNCH_COOPERATIVE)");
  }
  t.barrier.store(kind, std::memory_order_relaxed);
  t.file.store(file, std::memory_order_relaxed);
  t.line.store(line, std::memory_order_relaxed);
  t.status.store(ThreadState::kWaiting, std::memory_order_relaxed);
  switch_to_scheduler(t, /*finished=*/false, sync);
  if (t.abort.load(std::memory_order_relaxed)) throw BlockAborted{};
#if defined(GRU_EMU_TSAN)
  __tsan_acquire(sync);
#endif
}

inline void syncthreads(const char* file, int line) { barrier(kBlockBarrier, file, line); }
inline void cluster_sync(const char* file, int line) { barrier(kClusterBarrier, file, line); }
inline void grid_sync(const char* file, int line) { barrier(kGridBarrier, file, line); }

// blockIdx.x % cluster_x in a cluster launch, 0 in any other.
inline unsigned cluster_rank() { return current().run->cluster_rank; }

// DSMEM: p, into the calling block's dynamic shared memory, mapped to the same offset
// in the shared memory of block `rank` of its cluster.
inline void* map_shared(const void* p, unsigned rank) {
  const ThreadState& t = current();
  const BlockRun& r = *t.run;
  const Group& cluster = *r.cluster;
  if (rank >= cluster.size()) {
    device_error(t, "map_shared_rank: rank " + std::to_string(rank) +
                        " out of range for a cluster of " + std::to_string(cluster.size()) +
                        " blocks");
  }
  const uintptr_t at = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(r.smem);
  if (r.smem == nullptr || at < base || at >= base + r.smem_bytes) {
    device_error(t, "map_shared_rank: pointer not in this block's shared memory (" +
                        std::to_string(r.smem_bytes) + " bytes of dynamic shared memory)");
  }
  if (t.passed[kClusterBarrier] == 0) {
    device_error(t, "map_shared_rank: called before the first cluster barrier "
                    "(GRU_CLUSTER_SYNC()) of the thread: on the GPU, the peer block may not "
                    "have started");
  }
  const BlockRun& peer = cluster.member(rank);
  const uint8_t peer_end = peer.ended.load(std::memory_order_relaxed);
  if (peer_end != BlockRun::kNotEnded) {
    // A peer that failed first: that failure is the launch's, this one follows from it.
    current().consequence = peer_end == BlockRun::kEndedFailing;
    device_error(t, "map_shared_rank: block " + to_string(peer.idx) + " (rank " +
                        std::to_string(rank) + " of the cluster) has exited: its shared "
                        "memory is gone (a cluster barrier before it returns keeps it)");
  }
  return peer.smem + (at - base);
}

template <typename T>
T* map_shared_rank(T* p, unsigned rank) {
  return static_cast<T*>(map_shared(p, rank));
}

// "threads (0,0,0), (1,0,0), (2,0,0), (3,0,0), ... (37 threads)".
inline std::string describe_threads(const BlockRun& r, std::vector<unsigned> tids) {
  std::sort(tids.begin(), tids.end());
  std::string out = tids.size() == 1 ? "thread " : "threads ";
  for (size_t i = 0; i < tids.size() && i < 4; ++i) {
    out += (i ? ", " : "") + to_string(r.threads[tids[i]].thread_idx);
  }
  if (tids.size() > 4) out += ", ... (" + std::to_string(tids.size()) + " threads)";
  return out;
}

inline std::string site_of(const char* file, int line) {
  return std::string(file) + ":" + std::to_string(line);
}

inline std::string site_of(const ThreadState& t) {
  return site_of(t.file.load(std::memory_order_relaxed), t.line.load(std::memory_order_relaxed));
}

inline bool same_line(const char* file_a, int line_a, const char* file_b, int line_b) {
  return line_a == line_b && (file_a == file_b || std::strcmp(file_a, file_b) == 0);
}

// Why the generation whose waiting threads are `waiting` cannot complete, or "".
inline std::string check_generation(const BlockRun& r, const std::vector<unsigned>& waiting) {
  std::vector<unsigned> exited;
  for (unsigned t = 0; t < r.nthreads; ++t) {
    const uint8_t s = r.threads[t].status.load(std::memory_order_relaxed);
    if (s == ThreadState::kThrew) return r.threads[t].error;
    if (s == ThreadState::kExited) exited.push_back(t);
  }
  const std::string block = " in block " + to_string(r.idx);
  const ThreadState& first = r.threads[waiting[0]];
  const uint8_t kind = first.barrier.load(std::memory_order_relaxed);
  if (!exited.empty()) {
    return "gru_emu: divergent " + std::string(barrier_name(kind)) + " at " + site_of(first) +
           block + ": " + describe_threads(r, waiting) + " wait there, but " +
           describe_threads(r, exited) + " returned without reaching it (a barrier in "
           "divergent code: undefined on the GPU, where it may hang or corrupt results)";
  }
  // Every thread waits: at one barrier, one source line?
  bool one_site = true, one_kind = true;
  for (unsigned t : waiting) {
    const ThreadState& s = r.threads[t];
    one_kind = one_kind && s.barrier.load(std::memory_order_relaxed) == kind;
    one_site = one_site && one_kind &&
               same_line(s.file.load(std::memory_order_relaxed),
                         s.line.load(std::memory_order_relaxed),
                         first.file.load(std::memory_order_relaxed),
                         first.line.load(std::memory_order_relaxed));
  }
  if (one_site) return "";
  std::map<std::string, std::vector<unsigned>> by_site;
  for (unsigned t : waiting) {
    const ThreadState& s = r.threads[t];
    by_site[site_of(s) + (one_kind ? "" : std::string(" (") +
                                              barrier_name(s.barrier.load(std::memory_order_relaxed)) + ")")]
        .push_back(t);
  }
  std::string sites;
  for (const auto& [site, tids] : by_site) {
    sites += (sites.empty() ? "" : "; ") + describe_threads(r, tids) + " at " + site;
  }
  return "gru_emu: " +
         (one_kind ? std::string(barrier_name(kind)) + " reached from different source lines"
                   : std::string("different barriers reached")) +
         " in one generation" + block + ": " + sites +
         " (a barrier in divergent code: undefined on the GPU)";
}

// "block (1,0,0)", "blocks (0,0,0), (1,0,0), (2,0,0), (3,0,0), ... (16 blocks)": in
// blockIdx order.
inline std::string Group::blocks(std::vector<unsigned> ranks) const {
  const auto key = [this](unsigned rank) {
    const dim3 b = members_[rank].idx;
    return std::make_tuple(b.z, b.y, b.x);
  };
  std::sort(ranks.begin(), ranks.end(), [&](unsigned a, unsigned b) { return key(a) < key(b); });
  std::string out = ranks.size() == 1 ? "block " : "blocks ";
  for (size_t i = 0; i < ranks.size() && i < 4; ++i) {
    out += (i ? ", " : "") + to_string(members_[ranks[i]].idx);
  }
  if (ranks.size() > 4) out += ", ... (" + std::to_string(ranks.size()) + " blocks)";
  return out;
}

// Why the current generation can never complete ("" while it still may), with mu_
// held and at least one member waiting.
inline Group::Outcome Group::verdict() const {
  std::vector<unsigned> waiting, exited, failed;
  for (unsigned m = 0; m < size_; ++m) {
    if (waiting_at_[m].file != nullptr) waiting.push_back(m);
    if (gone_[m] == kExited) exited.push_back(m);
    if (gone_[m] == kFailed) failed.push_back(m);
  }
  const Site at = waiting_at_[waiting[0]];
  const std::string head = "gru_emu: " + std::string(barrier_name(kind_)) + " at " +
                           site_of(at.file, at.line) + ": " + blocks(waiting) +
                           (waiting.size() == 1 ? " waits" : " wait") + ", but ";
  if (!failed.empty()) return {head + blocks(failed) + " of " + scope() + " failed", true};
  if (!exited.empty()) {
    return {head + blocks(exited) + " of " + scope() +
                " returned without reaching it (a hang on the GPU)",
            false};
  }
  if (arrived_ < size_) return {};
  bool one_site = true;
  for (unsigned m : waiting) {
    one_site = one_site && same_line(waiting_at_[m].file, waiting_at_[m].line, at.file, at.line);
  }
  if (one_site) return {};
  std::map<std::string, std::vector<unsigned>> by_site;
  for (unsigned m : waiting) {
    by_site[site_of(waiting_at_[m].file, waiting_at_[m].line)].push_back(m);
  }
  std::string sites;
  for (const auto& [site, ranks] : by_site) {
    sites += (sites.empty() ? "" : "; ") + blocks(ranks) + " at " + site;
  }
  return {"gru_emu: " + std::string(barrier_name(kind_)) +
              " reached from different source lines by the blocks of " +
              (kind_ == kClusterBarrier ? "a cluster" : "the grid") + ": " + sites +
              " (a barrier in divergent code: undefined on the GPU)",
          false};
}

// With mu_ held: every wait of the group fails from now on, with `why`.
inline void Group::break_with(Outcome why) {
  broken_ = std::move(why.why);
  broken_by_failure_ = why.peer_failed;
  changed_.store_and_wake_all(changed_.load() + 1);
}

inline std::string Group::deadlock(unsigned rank) const {
  std::vector<unsigned> arrived, missing;
  for (unsigned m = 0; m < size_; ++m) {
    (waiting_at_[m].file != nullptr ? arrived : missing).push_back(m);
  }
  const Site at = waiting_at_[rank];
  return "gru_emu: deadlock: " + std::string(barrier_name(kind_)) + " at " +
         site_of(at.file, at.line) + ": in a " +
         (kind_ == kClusterBarrier ? "cluster" : "grid") + " of " + std::to_string(size_) +
         " blocks, " + blocks(arrived) + " arrived, " + blocks(missing) +
         " did not within GRU_EMU_WATCHDOG_S=" + std::to_string(watchdog_.count()) +
         " s (a hang on the GPU; if a block is only slow, raise GRU_EMU_WATCHDOG_S)";
}

inline Group::Outcome Group::arrive(unsigned rank, const char* file, int line) {
  if (size_ == 1) return {};
  std::unique_lock<std::mutex> lock(mu_);
  const uint64_t generation = generation_;
  if (broken_.empty()) {
    waiting_at_[rank] = Site{file, line};
    ++arrived_;
    Outcome why = verdict();
    if (!why.why.empty()) {
      break_with(std::move(why));
    } else if (arrived_ == size_) {
      arrived_ = 0;
      std::fill(waiting_at_.begin(), waiting_at_.end(), Site{});
      ++generation_;
      changed_.store_and_wake_all(changed_.load() + 1);
      return {};
    }
  }
  const WaitWord::Clock::time_point deadline = WaitWord::Clock::now() + watchdog_;
  for (;;) {
    if (generation_ != generation) return {};
    if (!broken_.empty()) return {broken_, broken_by_failure_};
    const uint32_t seen = changed_.load();
    lock.unlock();
    const bool changed = changed_.wait_while(seen, deadline);
    lock.lock();
    if (!changed && generation_ == generation && broken_.empty()) {
      break_with({deadlock(rank), false});
    }
  }
}

inline void Group::leave(unsigned rank, bool failed) {
  if (size_ == 1) return;
  std::lock_guard<std::mutex> lock(mu_);
  gone_[rank] = failed ? kFailed : kExited;
  if (broken_.empty() && arrived_ > 0) break_with(verdict());
}

// Runs every thread of the block: each up to its next barrier or its end, in a seeded
// order; then checks the generation, meets the block's cluster or grid if the barrier
// is theirs, and releases it.
inline void run_block(BlockRun& r) {
#if defined(GRU_EMU_TSAN)
  r.sched_tsan = __tsan_get_current_fiber();
#endif
  std::vector<unsigned> runnable(r.nthreads);
  for (unsigned t = 0; t < r.nthreads; ++t) {
    ThreadState& ts = r.threads[t];
    ts.status.store(ThreadState::kRunning, std::memory_order_relaxed);
    ts.abort.store(false, std::memory_order_relaxed);
    ts.error.clear();
    ts.consequence = false;
    std::fill(std::begin(ts.passed), std::end(ts.passed), 0u);
    ts.fiber->ctx.uc_stack.ss_sp = ts.fiber->stack;
    ts.fiber->ctx.uc_stack.ss_size = Fiber::kStackBytes;
    ts.fiber->ctx.uc_link = nullptr;
    const uint64_t self = reinterpret_cast<uintptr_t>(&ts), run = reinterpret_cast<uintptr_t>(&r);
    makecontext(&ts.fiber->ctx, reinterpret_cast<void (*)()>(fiber_main), 4,
                unsigned(self >> 32), unsigned(self), unsigned(run >> 32), unsigned(run));
    runnable[t] = t;
  }
#if defined(GRU_EMU_TSAN)
  __tsan_release(&r.start_sync);
#endif
  std::vector<unsigned> waiting;
  while (!runnable.empty()) {
    shuffle(runnable, r.order_state);
    for (unsigned t : runnable) switch_to_thread(r.threads[t]);
    waiting.clear();
    for (unsigned t : runnable) {
      if (r.threads[t].status.load(std::memory_order_relaxed) == ThreadState::kWaiting) {
        waiting.push_back(t);
      }
    }
    if (waiting.empty()) break;
#if defined(GRU_EMU_TSAN)
    __tsan_acquire(&r.done_sync);  // the error strings of threads that ended
#endif
    std::string why = check_generation(r, waiting);
    const ThreadState& first = r.threads[waiting[0]];
    const uint8_t kind = first.barrier.load(std::memory_order_relaxed);
    if (why.empty() && kind != kBlockBarrier) {
      const bool cluster = kind == kClusterBarrier;
      Group::Outcome met = (cluster ? r.cluster : r.grid)->arrive(
          cluster ? r.cluster_rank : r.grid_rank, first.file.load(std::memory_order_relaxed),
          first.line.load(std::memory_order_relaxed));
      why = std::move(met.why);
      r.peer_failed = met.peer_failed;
    }
    if (why.empty()) {
      for (unsigned t : waiting) r.threads[t].status.store(ThreadState::kRunning, std::memory_order_relaxed);
      runnable.swap(waiting);
      continue;
    }
    r.failure = why;
    for (unsigned t : waiting) {  // unwind them: their barrier throws BlockAborted
      r.threads[t].abort.store(true, std::memory_order_relaxed);
      switch_to_thread(r.threads[t]);
    }
    break;
  }
#if defined(GRU_EMU_TSAN)
  __tsan_acquire(&r.done_sync);  // everything the block did, before the launch returns
#endif
  // A thread that threw when no other one waited at a barrier.
  for (unsigned t = 0; t < r.nthreads && r.failure.empty(); ++t) {
    if (r.threads[t].status.load(std::memory_order_relaxed) == ThreadState::kThrew) {
      r.failure = r.threads[t].error;
    }
  }
  // A failure that only follows from a peer's (its shared memory gone because it failed)
  // is reported as the peer's: the launch names the first cause.
  for (unsigned t = 0; t < r.nthreads && !r.failure.empty() && !r.peer_failed; ++t) {
    const ThreadState& ts = r.threads[t];
    if (ts.status.load(std::memory_order_relaxed) == ThreadState::kThrew && ts.consequence &&
        ts.error == r.failure) {
      r.peer_failed = true;
    }
  }
  const bool failed = !r.failure.empty();
  // The block has ended: its shared memory is gone for its cluster peers (mapping it
  // fails; AddressSanitizer reports an access through a pointer mapped before), and its
  // groups learn that it will not arrive at a barrier again.
  r.ended.store(failed ? BlockRun::kEndedFailing : BlockRun::kEnded, std::memory_order_relaxed);
#if defined(GRU_EMU_ASAN)
  if (r.smem != nullptr) ASAN_POISON_MEMORY_REGION(r.smem, r.smem_bytes);
#endif
  r.cluster->leave(r.cluster_rank, failed);
  if (r.grid != nullptr) r.grid->leave(r.grid_rank, failed);
}

// --- OS threads: the blocks of a wave ----------------------------------------------------

// Worker threads that run the blocks of one wave at a time, one block each. Kept for
// the whole process.
//
// No happens-before edge may join two jobs of one run (ThreadSanitizer would then miss
// races between blocks). So each sync object is used either only before the jobs start
// or only after they end: a worker sees the run published (start_, published_), then
// counts itself in at a start gate and waits there until every worker of the run has
// (gate_): every edge the gate makes ends before any job starts. After its job a worker
// only counts itself out (remaining_, done_), which orders nothing it does later in
// this run. (The jobs' schedulers do synchronise at cluster and grid barriers, through
// Group, once their fibers have started: see there why no fiber inherits those edges.)
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }

  // Runs job(id) for id in [0, n), each on its own thread, and returns when all are done.
  // job must not throw. One run at a time (the caller holds the launch lock).
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    const uint32_t run_id = ++runs_;  // never 0, the words' initial value
    job_ = &job;
    gate_count_.store(0, std::memory_order_relaxed);
    remaining_.store(n, std::memory_order_relaxed);
    published_.store(uint64_t(run_id) << 32 | n, std::memory_order_release);
    start_.store_and_wake_all(run_id);
    done_.wait_until(run_id);
  }

  ~WorkerPool() {
    published_.store(uint64_t(++runs_) << 32, std::memory_order_release);  // n = 0: stop
    start_.store_and_wake_all(runs_);
    for (auto& w : workers_) w.join();
  }

 private:
  void loop(unsigned id) {
    uint32_t seen = 0;
    for (;;) {
      start_.wait_while(seen);
      // The newest run (a worker left out of some runs may have slept through them).
      const uint64_t pub = published_.load(std::memory_order_acquire);
      seen = uint32_t(pub >> 32);
      const unsigned n = unsigned(pub & 0xffffffffu);
      if (n == 0) return;
      if (id >= n) continue;
      const std::function<void(unsigned)>& job = *job_;
      if (gate_count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
        gate_.store_and_wake_all(seen);
      } else {
        gate_.wait_until(seen);
      }
      job(id);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_.store_and_wake_all(seen);
    }
  }

  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;  // published by published_
  uint32_t runs_ = 0;
  std::atomic<uint64_t> published_{0};  // (run << 32) | workers in it
  std::atomic<unsigned> gate_count_{0}, remaining_{0};
  WaitWord start_, gate_, done_;
};

// --- launch configuration: seed, waves, shared memory opt-ins (host side) ---------------

struct Config {
  std::mutex mu;          // held by a whole launch: launches run one at a time
  bool seed_set = false;  // set_seed() overrides GRU_EMU_SEED
  uint64_t seed = 0;
  uint64_t launches = 0;  // since the seed was last set: launch k uses (seed, k)
  std::map<const void*, size_t> smem_opt_in;
  std::map<const void*, bool> non_portable_clusters;  // kernels allowed clusters of 16
  std::map<std::string, uint64_t> launch_counts;  // launches that ran, per kernel expression
  std::map<std::string, unsigned> cluster_sizes;  // the last one's blocks per cluster (1: none)
  std::vector<std::unique_ptr<Fiber>> fibers;     // grown on demand, never freed
};

inline Config& config() {
  static Config c;
  return c;
}

inline uint64_t env_u64(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const unsigned long long x = std::strtoull(v, &end, 0);
  if (*end != '\0') throw std::invalid_argument(std::string(name) + "=" + v + ": not an integer");
  return x;
}

constexpr uint64_t kDefaultSeed = 0x5eed;
// CUDA threads per wave. Under ThreadSanitizer every synchronisation costs time in
// proportion to the number of fibers, so its waves are smaller (4 blocks of 256).
#if defined(GRU_EMU_TSAN)
constexpr uint64_t kDefaultWaveThreads = 1024;
// gcc's ThreadSanitizer dies past 8128 threads and fibers: the most CUDA threads (and
// their blocks' OS threads) a wave may have, leaving room for the program's own.
constexpr uint64_t kMaxWaveThreads = 8000;
#else
constexpr uint64_t kDefaultWaveThreads = 4096;
#endif
constexpr uint64_t kDefaultWatchdogSeconds = 60;

// The seed of the block and thread order of later launches; clear_seed() returns to
// GRU_EMU_SEED (read at every launch), or the default.
inline void set_seed(uint64_t seed) {
  std::lock_guard<std::mutex> lock(config().mu);
  config().seed_set = true;
  config().seed = seed;
  config().launches = 0;
}

inline void clear_seed() {
  std::lock_guard<std::mutex> lock(config().mu);
  config().seed_set = false;
  config().launches = 0;
}

// The order in which the blocks [0, n) of a launch run: a permutation drawn from
// (seed, launch).
inline std::vector<unsigned> block_order(uint64_t seed, uint64_t launch, unsigned n) {
  uint64_t state = seed ^ hash64(launch);
  std::vector<unsigned> order(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  shuffle(order, state);
  return order;
}

// The linear ids of a launch's blocks in the order they run: its clusters of cluster_x
// blocks along x in block_order's permutation, each cluster's blocks together and in
// rank order. With cluster_x = 1, block_order itself.
inline std::vector<unsigned> launch_order(uint64_t seed, uint64_t launch, dim3 grid,
                                          unsigned cluster_x) {
  const dim3 clusters(grid.x / cluster_x, grid.y, grid.z);
  std::vector<unsigned> order;
  order.reserve(size_t(grid.x) * grid.y * grid.z);
  for (unsigned c : block_order(seed, launch, clusters.x * clusters.y * clusters.z)) {
    const dim3 at = unflatten(c, clusters);
    for (unsigned rank = 0; rank < cluster_x; ++rank) {
      order.push_back(at.x * cluster_x + rank + grid.x * (at.y + grid.y * at.z));
    }
  }
  return order;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
template <typename... KArgs>
void set_max_dynamic_smem(void (*kernel)(KArgs...), size_t bytes) {
  if (bytes > kMaxOptInSmemBytes) {
    throw std::invalid_argument("gru_emu: GRU_SET_MAX_DYNAMIC_SMEM(" + std::to_string(bytes) +
                                " bytes): over the " + std::to_string(kMaxOptInSmemBytes) +
                                " bytes a block may have (sm_90)");
  }
  std::lock_guard<std::mutex> lock(config().mu);
  config().smem_opt_in[reinterpret_cast<const void*>(kernel)] = bytes;
}

// cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1).
template <typename... KArgs>
void allow_non_portable_cluster(void (*kernel)(KArgs...)) {
  std::lock_guard<std::mutex> lock(config().mu);
  config().non_portable_clusters[reinterpret_cast<const void*>(kernel)] = true;
}

// The largest cluster `kernel` may be launched in. The caller holds cfg.mu.
inline unsigned cluster_limit(const Config& cfg, const void* kernel) {
  return cfg.non_portable_clusters.count(kernel) ? kMaxNonPortableClusterBlocks : kMaxClusterBlocks;
}

// The dynamic shared memory a block of `kernel` may have. The caller holds cfg.mu.
inline size_t smem_limit(const Config& cfg, const void* kernel) {
  const auto opt = cfg.smem_opt_in.find(kernel);
  return opt != cfg.smem_opt_in.end() ? opt->second : kDefaultSmemBytes;
}

// --- the emulated device: properties and occupancy ----------------------------------------

struct EmulatedDevice {
  int cc_major = 9, cc_minor = 0;
  unsigned sm_count = 16;
  int64_t max_blocks_per_sm = -1;  // GRU_EMU_MAX_BLOCKS_PER_SM; -1: what the SM holds
  unsigned max_cluster = kMaxNonPortableClusterBlocks;  // GRU_EMU_MAX_CLUSTER
};

// GRU_EMU_CC ("major.minor", default 9.0), GRU_EMU_SM_COUNT (default 16),
// GRU_EMU_MAX_BLOCKS_PER_SM (unset: what the SM's threads and shared memory allow; a
// number caps it, as registers would; 0 makes every kernel fit nowhere, so that tests
// reach the co-residency refusals) and GRU_EMU_MAX_CLUSTER (default 16: the widest
// cluster the occupancy API finds room for, as a GPU's GPCs bound it; the launch
// limits of 8 and 16 stay), read at every call: tests change them between launches.
inline EmulatedDevice emulated_device() {
  EmulatedDevice d;
  const char* cc = std::getenv("GRU_EMU_CC");
  if (cc != nullptr && *cc != '\0') {
    char tail = 0;
    if (std::sscanf(cc, "%d.%d%c", &d.cc_major, &d.cc_minor, &tail) != 2 || d.cc_major < 1 ||
        d.cc_minor < 0) {
      throw std::invalid_argument(std::string("GRU_EMU_CC=") + cc + ": not major.minor (e.g. 9.0)");
    }
  }
  const uint64_t sms = env_u64("GRU_EMU_SM_COUNT", d.sm_count);
  if (sms == 0 || sms > 1024) {
    throw std::invalid_argument("GRU_EMU_SM_COUNT=" + std::to_string(sms) + ": not 1..1024");
  }
  d.sm_count = static_cast<unsigned>(sms);
  const char* cap = std::getenv("GRU_EMU_MAX_BLOCKS_PER_SM");
  if (cap != nullptr && *cap != '\0') {
    d.max_blocks_per_sm = static_cast<int64_t>(env_u64("GRU_EMU_MAX_BLOCKS_PER_SM", 0));
  }
  const uint64_t max_cluster = env_u64("GRU_EMU_MAX_CLUSTER", d.max_cluster);
  if (max_cluster == 0 || max_cluster > kMaxNonPortableClusterBlocks) {
    throw std::invalid_argument("GRU_EMU_MAX_CLUSTER=" + std::to_string(max_cluster) +
                                ": not 1.." + std::to_string(kMaxNonPortableClusterBlocks));
  }
  d.max_cluster = static_cast<unsigned>(max_cluster);
  return d;
}

// cudaGetDeviceProperties for what Props (GruDeviceProps) asks of the emulated device.
template <typename Props>
Props device_props() {
  const EmulatedDevice d = emulated_device();
  Props p;
  p.cc_major = d.cc_major;
  p.cc_minor = d.cc_minor;
  p.sm_count = static_cast<int>(d.sm_count);
  p.smem_per_block_optin = kMaxOptInSmemBytes;
  p.smem_per_sm = kSmemPerSm;
  p.cooperative = true;
  p.clusters = d.cc_major >= 9;
  return p;
}

// The blocks of `threads` threads with `smem` bytes of dynamic shared memory that one SM
// holds at once: bounded by its threads, its blocks and its shared memory (1 KB of it
// reserved per block); 0 when smem is over what the kernel may have. Registers and
// static shared memory are not modelled: a GPU may fit fewer. The caller holds cfg.mu.
inline int blocks_per_sm(const Config& cfg, const EmulatedDevice& d, const void* kernel,
                         unsigned threads, size_t smem) {
  if (threads == 0 || threads > 1024 || smem > smem_limit(cfg, kernel)) return 0;
  const size_t fit = std::min<size_t>(
      {kMaxThreadsPerSm / threads, kMaxBlocksPerSm, kSmemPerSm / (smem + kSmemReservedPerBlock)});
  return static_cast<int>(d.max_blocks_per_sm < 0
                              ? fit
                              : std::min<size_t>(fit, static_cast<size_t>(d.max_blocks_per_sm)));
}

// The clusters of cluster_x such blocks the device holds at once; 0 when one does not
// fit (its blocks need more SMs than the device has) or the size is invalid.
inline int clusters_per_device(const Config& cfg, const EmulatedDevice& d, const void* kernel,
                               unsigned threads, size_t smem, unsigned cluster_x) {
  const int per_sm = blocks_per_sm(cfg, d, kernel, threads, smem);
  if (per_sm == 0 || cluster_x == 0 || cluster_x > cluster_limit(cfg, kernel) ||
      cluster_x > d.max_cluster || d.cc_major < 9) {
    return 0;
  }
  if ((cluster_x + per_sm - 1) / per_sm > d.sm_count) return 0;
  return static_cast<int>(d.sm_count * per_sm / cluster_x);
}

// cudaOccupancyMaxActiveBlocksPerMultiprocessor.
inline int max_active_blocks_per_sm(const void* kernel, unsigned threads, size_t smem) {
  const EmulatedDevice d = emulated_device();
  std::lock_guard<std::mutex> lock(config().mu);
  return blocks_per_sm(config(), d, kernel, threads, smem);
}

// cudaOccupancyMaxActiveClusters for clusters of (cluster_x, 1, 1); the grid does not
// matter.
inline int max_active_clusters(const void* kernel, dim3 /*grid*/, dim3 block, size_t smem,
                               unsigned cluster_x) {
  const EmulatedDevice d = emulated_device();
  std::lock_guard<std::mutex> lock(config().mu);
  return clusters_per_device(config(), d, kernel, block.x * block.y * block.z, smem, cluster_x);
}

// --- launches -----------------------------------------------------------------------------

enum class LaunchKind { kPlain, kCluster, kCooperative };

struct LaunchShape {
  dim3 grid, block;
  size_t smem_bytes;
  LaunchKind kind;
  unsigned cluster_x;  // blocks per cluster along x: 1 unless kind is kCluster

  unsigned threads() const { return block.x * block.y * block.z; }
  unsigned blocks() const { return grid.x * grid.y * grid.z; }
};

inline std::string launch_where(const LaunchSite& at) {
  return std::string("gru_emu: launch of ") + at.kernel + " at " + at.file + ":" +
         std::to_string(at.line) + ": ";
}

inline void check_configuration(const Config& cfg, const LaunchSite& at, const void* kernel,
                                dim3 grid, dim3 block, size_t smem_bytes) {
  const std::string where = launch_where(at);
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64) {
    throw std::invalid_argument(where + "block " + to_string(block) + " of " +
                                std::to_string(nthreads) +
                                " threads (CUDA allows 1..1024, z <= 64)");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::invalid_argument(where + "grid " + to_string(grid) +
                                " (CUDA allows x >= 1, 1 <= y, z <= 65535)");
  }
  if (uint64_t(grid.x) * grid.y * grid.z > (1u << 24)) {
    throw std::invalid_argument(where + "grid " + to_string(grid) +
                                ": more blocks than the emulator runs");
  }
  const bool opted = cfg.smem_opt_in.count(kernel) != 0;
  const size_t limit = smem_limit(cfg, kernel);
  if (smem_bytes > limit) {
    throw std::invalid_argument(
        where + std::to_string(smem_bytes) + " bytes of dynamic shared memory, over the " +
        std::to_string(limit) + "-byte limit" +
        (opted ? " the kernel opted in to"
               : " a block gets without opting in (GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes), "
                 "up to " + std::to_string(kMaxOptInSmemBytes) + " on sm_90)"));
  }
}

// Whether a launch may run: throws std::invalid_argument for a configuration CUDA
// rejects; false when the device cannot make the blocks of a cluster, or of a
// cooperative grid, co-resident (which a GPU reports as an error the caller falls back
// from). The caller holds cfg.mu.
inline bool admit(const Config& cfg, const LaunchSite& at, const void* kernel, const LaunchShape& s) {
  check_configuration(cfg, at, kernel, s.grid, s.block, s.smem_bytes);
  if (s.kind == LaunchKind::kPlain) return true;
  const EmulatedDevice d = emulated_device();
  const std::string where = launch_where(at);
  if (s.kind == LaunchKind::kCooperative) {
    const int per_sm = blocks_per_sm(cfg, d, kernel, s.threads(), s.smem_bytes);
    return uint64_t(s.blocks()) <= uint64_t(d.sm_count) * per_sm;
  }
  if (s.cluster_x == 0 || s.cluster_x > cluster_limit(cfg, kernel)) {
    throw std::invalid_argument(
        where + "a cluster of " + std::to_string(s.cluster_x) + " blocks (CUDA allows 1.." +
        std::to_string(cluster_limit(cfg, kernel)) + (cluster_limit(cfg, kernel) == kMaxClusterBlocks
            ? ", the portable sizes; up to " + std::to_string(kMaxNonPortableClusterBlocks) +
                  " on sm_90 for a kernel that allowed non-portable sizes)"
            : " on sm_90 with non-portable sizes allowed)"));
  }
  if (d.cc_major < 9) {
    throw std::invalid_argument(where + "a cluster launch on an emulated device of compute "
                                "capability " + std::to_string(d.cc_major) + "." +
                                std::to_string(d.cc_minor) + " (clusters need 9.0; GRU_EMU_CC)");
  }
  if (s.grid.x % s.cluster_x != 0) {
    throw std::invalid_argument(where + "grid " + to_string(s.grid) +
                                " is not a whole number of clusters of " +
                                std::to_string(s.cluster_x) + " blocks along x");
  }
  return clusters_per_device(cfg, d, kernel, s.threads(), s.smem_bytes, s.cluster_x) > 0;
}

// A block's dynamic shared memory: a malloc of exactly `bytes`, so that overruns (and a
// cluster peer's, through DSMEM) hit AddressSanitizer's redzones, filled with 0xFF
// bytes. run_block poisons it when the block ends; it is unpoisoned before it is freed.
class SharedMemory {
 public:
  SharedMemory() = default;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory() { reset(0); }

  unsigned char* data() const { return p_; }

  // Frees the memory held, then allocates `bytes` (none for 0).
  void reset(size_t bytes) {
    if (p_ != nullptr) {
#if defined(GRU_EMU_ASAN)
      ASAN_UNPOISON_MEMORY_REGION(p_, bytes_);
#endif
      std::free(p_);
      p_ = nullptr;
    }
    bytes_ = bytes;
    if (bytes == 0) return;
    p_ = static_cast<unsigned char*>(std::malloc(bytes));
    if (p_ == nullptr) throw std::bad_alloc();
    std::memset(p_, 0xFF, bytes);
  }

 private:
  unsigned char* p_ = nullptr;
  size_t bytes_ = 0;
};

// Runs an admitted launch: its blocks in waves (whole clusters; one wave for a
// cooperative launch), each block on its own OS thread. Throws std::runtime_error with
// the failure of a block: one of its own rather than one that only says a peer failed.
// The caller holds cfg.mu.
inline void run_grid(Config& cfg, const LaunchSite& at, const std::function<void()>& body,
                     const LaunchShape& s) {
  const unsigned nthreads = s.threads(), nblocks = s.blocks(), cluster = s.cluster_x;
  const uint64_t seed = cfg.seed_set ? cfg.seed : env_u64("GRU_EMU_SEED", kDefaultSeed);
  const uint64_t wave_threads = env_u64("GRU_EMU_WAVE_THREADS", kDefaultWaveThreads);
  const uint64_t watchdog_s = env_u64("GRU_EMU_WATCHDOG_S", kDefaultWatchdogSeconds);
  if (watchdog_s == 0) {
    throw std::invalid_argument("GRU_EMU_WATCHDOG_S=0: not a positive number of seconds");
  }
  const unsigned budget = static_cast<unsigned>(
      std::min<uint64_t>({std::max<uint64_t>(2, wave_threads / nthreads), 16, nblocks}));
  const unsigned per_wave = s.kind == LaunchKind::kCooperative
                                ? nblocks
                                : std::max(cluster, budget / cluster * cluster);
#if defined(GRU_EMU_TSAN)
  if (uint64_t(per_wave) * (nthreads + 1) > kMaxWaveThreads) {
    throw std::runtime_error(launch_where(at) + "a wave of " + std::to_string(per_wave) +
                             " blocks of " + std::to_string(nthreads) +
                             " threads: more fibers than ThreadSanitizer can track (about " +
                             std::to_string(kMaxWaveThreads) + " CUDA threads per wave)");
  }
#endif
  const uint64_t launch_no = cfg.launches++;
  ++cfg.launch_counts[at.kernel];
  cfg.cluster_sizes[at.kernel] = cluster;
  const std::vector<unsigned> order = launch_order(seed, launch_no, s.grid, cluster);

  while (cfg.fibers.size() < size_t(per_wave) * nthreads) {
    cfg.fibers.push_back(std::make_unique<Fiber>());
  }
  std::vector<ThreadState> threads(size_t(per_wave) * nthreads);
  std::vector<BlockRun> wave(per_wave);
  std::vector<SharedMemory> smem(per_wave);
  // A wave's clusters (each its blocks, consecutive in `wave`), and its grid.
  const std::unique_ptr<Group[]> clusters(new Group[per_wave / cluster]);
  const std::unique_ptr<Group> grid_group(s.kind == LaunchKind::kCooperative ? new Group : nullptr);
  const std::chrono::seconds watchdog(watchdog_s);

  for (unsigned first = 0; first < nblocks; first += per_wave) {
    const unsigned count = std::min(per_wave, nblocks - first);  // whole clusters
    for (unsigned w = 0; w < count; ++w) {
      BlockRun& r = wave[w];
      const unsigned linear = order[first + w];
      r.idx = unflatten(linear, s.grid);
      r.threads = &threads[size_t(w) * nthreads];
      r.nthreads = nthreads;
      r.kernel = &body;
      r.order_state = hash64(seed ^ hash64(launch_no) ^ hash64(~uint64_t(linear)));
      smem[w].reset(s.smem_bytes);
      r.smem = smem[w].data();
      r.smem_bytes = s.smem_bytes;
      r.cluster = &clusters[w / cluster];
      r.cluster_rank = w % cluster;  // = r.idx.x % cluster: launch_order keeps rank order
      r.grid = grid_group.get();
      r.grid_rank = w;
      r.ended.store(BlockRun::kNotEnded, std::memory_order_relaxed);
      r.failure.clear();
      r.peer_failed = false;
      for (unsigned t = 0; t < nthreads; ++t) {
        ThreadState& ts = r.threads[t];
        ts.thread_idx = unflatten(t, s.block);
        ts.block_idx = r.idx;
        ts.block_dim = s.block;
        ts.grid_dim = s.grid;
        ts.smem = r.smem;
        ts.run = &r;
        ts.fiber = cfg.fibers[size_t(w) * nthreads + t].get();
      }
    }
    for (unsigned c = 0; c < count / cluster; ++c) {
      clusters[c].reset(kClusterBarrier, &wave[c * cluster], cluster, watchdog);
    }
    if (grid_group) grid_group->reset(kGridBarrier, wave.data(), count, watchdog);
    WorkerPool::instance().run(count, [&](unsigned w) { run_block(wave[w]); });
    const BlockRun* failed = nullptr;
    for (unsigned w = 0; w < count; ++w) {
      const BlockRun& r = wave[w];
      if (!r.failure.empty() && (failed == nullptr || (failed->peer_failed && !r.peer_failed))) {
        failed = &r;
      }
    }
    if (failed != nullptr) {
      throw std::runtime_error(failed->failure + " [launch of " + at.kernel + " at " + at.file +
                               ":" + std::to_string(at.line) + ", grid " + to_string(s.grid) +
                               ", block " + to_string(s.block) +
                               (cluster > 1 ? ", cluster " + to_string(dim3(cluster)) : "") +
                               ", GRU_EMU_SEED=" + std::to_string(seed) + ", launch " +
                               std::to_string(launch_no) + "]");
    }
  }
}

// Every kind of launch: checks it, converts the arguments once (as a CUDA launch copies
// them; every thread gets its own copy of the by-value parameters) and runs it. False,
// running nothing, when the device cannot make the blocks co-resident.
template <typename... KArgs, typename... Args>
bool launch_shaped(const LaunchSite& at, void (*kernel)(KArgs...), const LaunchShape& shape,
                   Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel launched with the wrong arity");
  Config& cfg = config();
  std::lock_guard<std::mutex> one_launch_at_a_time(cfg.mu);
  if (!admit(cfg, at, reinterpret_cast<const void*>(kernel), shape)) return false;
  const std::tuple<std::decay_t<KArgs>...> kargs(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, kargs); };
  run_grid(cfg, at, body, shape);
  return true;
}

// kernel<<<grid, block, smem_bytes>>>(args...).
template <typename... KArgs, typename... Args>
void launch(const LaunchSite& at, void (*kernel)(KArgs...), dim3 grid, dim3 block,
            size_t smem_bytes, Args&&... args) {
  launch_shaped(at, kernel, LaunchShape{grid, block, smem_bytes, LaunchKind::kPlain, 1},
                std::forward<Args>(args)...);
}

// cudaLaunchKernelEx with clusters of (cluster_x, 1, 1) blocks; false, running nothing,
// when max_active_clusters() is 0.
template <typename... KArgs, typename... Args>
bool launch_cluster(const LaunchSite& at, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                    size_t smem_bytes, unsigned cluster_x, Args&&... args) {
  return launch_shaped(at, kernel,
                       LaunchShape{grid, block, smem_bytes, LaunchKind::kCluster, cluster_x},
                       std::forward<Args>(args)...);
}

// cudaLaunchCooperativeKernel; false, running nothing, when the grid has more blocks
// than sm_count * max_active_blocks_per_sm (cudaErrorCooperativeLaunchTooLarge).
template <typename... KArgs, typename... Args>
bool launch_cooperative(const LaunchSite& at, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                        size_t smem_bytes, Args&&... args) {
  return launch_shaped(at, kernel,
                       LaunchShape{grid, block, smem_bytes, LaunchKind::kCooperative, 1},
                       std::forward<Args>(args)...);
}

// The launches that ran (refused ones are not counted; failed ones are), per kernel
// expression as written at the launch.
inline std::map<std::string, uint64_t> launch_counts() {
  std::lock_guard<std::mutex> lock(config().mu);
  return config().launch_counts;
}

inline void reset_launch_counts() {
  std::lock_guard<std::mutex> lock(config().mu);
  config().launch_counts.clear();
  config().cluster_sizes.clear();
}

// The blocks per cluster of the last launch of `kernel` that ran (1 for a launch without
// clusters), 0 if none ran since reset_launch_counts().
inline unsigned last_cluster_size(const std::string& kernel) {
  std::lock_guard<std::mutex> lock(config().mu);
  const auto it = config().cluster_sizes.find(kernel);
  return it == config().cluster_sizes.end() ? 0 : it->second;
}

}  // namespace gru_emu

using gru_emu::dim3;
#define threadIdx (gru_emu::current().thread_idx)
#define blockIdx (gru_emu::current().block_idx)
#define blockDim (gru_emu::current().block_dim)
#define gridDim (gru_emu::current().grid_dim)
// The source line identifies the barrier: every thread of a generation must reach it
// from the same line (a helper's barrier is one line whoever calls the helper).
#define __syncthreads() gru_emu::syncthreads(__FILE__, __LINE__)
