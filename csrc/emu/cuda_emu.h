// A small CUDA emulation layer: runs the project's CUDA kernels on the CPU, so that the
// test suite executes them on machines without a GPU, under AddressSanitizer and
// ThreadSanitizer too. Selected by -DGRU_EMULATE_CUDA through cuda/cuda_compat.h.
// Linux only (ucontext fibers, futexes).
//
// Supported (and all the kernels may use): __global__/__device__/__host__ functions,
// __forceinline__, __restrict__, __launch_bounds__ (accepted, ignored), threadIdx /
// blockIdx / blockDim / gridDim, __syncthreads(), per-block dynamic shared memory
// (GRU_DYNAMIC_SMEM), its opt-in limit (GRU_SET_MAX_DYNAMIC_SMEM) and launches through
// GRU_LAUNCH. No warp intrinsics, no static __shared__ arrays, no atomics, no grid-wide
// barrier: the kernels do not use them.
//
// Model:
// - Blocks: the blocks of a launch run in waves of 2 to 16 blocks (up to
//   GRU_EMU_WAVE_THREADS CUDA threads per wave: default 4096, 1024 under
//   ThreadSanitizer), each block of a wave on its own OS thread, all at once. The block
//   order is a permutation drawn from a seed (GRU_EMU_SEED, or set_seed()) and the
//   launch's number. Nothing synchronises two blocks of a wave (see WorkerPool), so
//   ThreadSanitizer reports a race between blocks as it does one between threads, and
//   a result that depends on block order changes with the seed. Waves, and consecutive
//   launches, are ordered (stream order).
// - Threads: the CUDA threads of a block are fibers (ucontext, each its own stack) that
//   the block's OS thread runs one at a time, each up to its next __syncthreads() or its
//   return, in an order drawn anew from the seed at every barrier. ThreadSanitizer is
//   told about the fibers (__tsan_*_fiber) and that __syncthreads() is the only ordering
//   between them (release on arrival, acquire on leaving), so a missing barrier is a
//   data race it reports. AddressSanitizer is told about the stack switches (and its
//   swapcontext interceptor, which would wipe the redzones of suspended frames, is
//   bypassed).
// - __syncthreads(): a generation completes when every thread of the block waits at the
//   same source line. The launch fails (std::runtime_error naming the line, the block
//   and the threads; never a hang) when a generation is reached from different lines,
//   or when some threads wait at a barrier that others returned without reaching
//   (undefined on the GPU: a hang or corrupt results). Returning after the last barrier
//   is fine.
// - Shared memory: a malloc of exactly the launch's size per block, filled with 0xFF
//   bytes (NaN for floats), so overruns hit AddressSanitizer's redzones and reads of
//   unwritten shared memory turn results into NaN. A launch asking for more than 48 KB
//   fails unless the kernel opted in (GRU_SET_MAX_DYNAMIC_SMEM, at most 227 KB as on
//   sm_90).
// - Launch configuration: block of 1..1024 threads (z <= 64), grid y and z <= 65535.
//
// Not modelled: warps (no lockstep, no warp-synchronous code, no shuffles; threads
// switch only at barriers and are never preempted, so an intra-block race shows in
// values only through the seeded order, though always to ThreadSanitizer, and a thread
// that spins waiting for another thread or block hangs), the GPU memory model beyond
// happens-before (no caches, no weak ordering, no fences), co-residency and occupancy
// (registers, blocks per SM, __launch_bounds__, static shared memory), races between
// blocks of different waves, timing, and device floating point (FMA contraction, fast
// intrinsics).
#pragma once

#include <sys/mman.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
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
  uint32_t load() const { return v_.load(std::memory_order_acquire); }

  // Returns the first value seen that differs from old.
  uint32_t wait_while(uint32_t old) const {
    uint32_t now;
    while ((now = load()) == old) {
      syscall(SYS_futex, &v_, FUTEX_WAIT_PRIVATE, old, nullptr, nullptr, 0);
    }
    return now;
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

struct BlockRun;

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
  std::atomic<const char*> file{nullptr};  // the barrier it waits at
  std::atomic<int> line{0};
  std::atomic<bool> abort{false};          // set by the scheduler: unwind at the barrier
  unsigned barriers = 0;                   // generations passed
  std::string error;                       // kThrew: what; read after done_sync
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

// One block of a wave, run by one OS thread (run_block).
struct BlockRun {
  dim3 idx;
  ThreadState* threads = nullptr;  // [nthreads]
  unsigned nthreads = 0;
  const std::function<void()>* kernel = nullptr;  // the kernel with the launch's arguments
  uint64_t order_state = 0;                       // seeds the threads' order per generation
  std::string failure;                            // empty: the block ran fine
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
  try {
    (*t.run->kernel)();
  } catch (const BlockAborted&) {
    status = ThreadState::kAborted;
  } catch (const std::exception& e) {
    status = ThreadState::kThrew;
    t.error = e.what();
  } catch (...) {
    status = ThreadState::kThrew;
    t.error = "an exception not derived from std::exception";
  }
  t.status.store(status, std::memory_order_relaxed);
  switch_to_scheduler(t, /*finished=*/true, &t.run->done_sync);
  std::abort();  // a finished fiber is never resumed, only restarted (makecontext)
}

inline void syncthreads(const char* file, int line) {
  ThreadState& t = current();
  t.file.store(file, std::memory_order_relaxed);
  t.line.store(line, std::memory_order_relaxed);
  t.status.store(ThreadState::kWaiting, std::memory_order_relaxed);
  char* const sync = &t.run->barrier_sync[t.barriers++ % 2];
  switch_to_scheduler(t, /*finished=*/false, sync);
  if (t.abort.load(std::memory_order_relaxed)) throw BlockAborted{};
#if defined(GRU_EMU_TSAN)
  __tsan_acquire(sync);
#endif
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

inline std::string site_of(const ThreadState& t) {
  return std::string(t.file.load(std::memory_order_relaxed)) + ":" +
         std::to_string(t.line.load(std::memory_order_relaxed));
}

// Why the generation whose waiting threads are `waiting` cannot complete, or "".
inline std::string check_generation(const BlockRun& r, const std::vector<unsigned>& waiting) {
  std::vector<unsigned> exited, threw;
  for (unsigned t = 0; t < r.nthreads; ++t) {
    const uint8_t s = r.threads[t].status.load(std::memory_order_relaxed);
    if (s == ThreadState::kExited) exited.push_back(t);
    if (s == ThreadState::kThrew) threw.push_back(t);
  }
  const std::string block = " in block " + to_string(r.idx);
  if (!threw.empty()) {
    const ThreadState& t = r.threads[threw[0]];
    return "gru_emu: exception in thread " + to_string(t.thread_idx) + block + ": " + t.error;
  }
  if (!exited.empty()) {
    return "gru_emu: divergent __syncthreads() at " + site_of(r.threads[waiting[0]]) + block +
           ": " + describe_threads(r, waiting) + " wait there, but " +
           describe_threads(r, exited) + " returned without reaching it (a barrier in "
           "divergent code: undefined on the GPU, where it may hang or corrupt results)";
  }
  // Every thread waits: at one source line?
  std::map<std::string, std::vector<unsigned>> by_site;
  for (unsigned t : waiting) by_site[site_of(r.threads[t])].push_back(t);
  if (by_site.size() == 1) return "";
  std::string sites;
  for (const auto& [site, tids] : by_site) {
    sites += (sites.empty() ? "" : "; ") + describe_threads(r, tids) + " at " + site;
  }
  return "gru_emu: __syncthreads() reached from different source lines in one generation" +
         block + ": " + sites + " (a barrier in divergent code: undefined on the GPU)";
}

// Runs every thread of the block: each up to its next barrier or its end, in a seeded
// order; then checks the generation and releases it.
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
    ts.barriers = 0;
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
      r.failure = check_generation(r, {t});
    }
  }
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
// this run.
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
  std::vector<std::unique_ptr<Fiber>> fibers;  // grown on demand, never freed
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
#else
constexpr uint64_t kDefaultWaveThreads = 4096;
#endif

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

inline void check_configuration(const LaunchSite& at, const void* kernel, dim3 grid, dim3 block,
                                size_t smem_bytes) {
  const std::string where = std::string("gru_emu: launch of ") + at.kernel + " at " + at.file +
                            ":" + std::to_string(at.line) + ": ";
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
  const auto opt = config().smem_opt_in.find(kernel);
  const bool opted = opt != config().smem_opt_in.end();
  const size_t limit = opted ? opt->second : kDefaultSmemBytes;
  if (smem_bytes > limit) {
    throw std::invalid_argument(
        where + std::to_string(smem_bytes) + " bytes of dynamic shared memory, over the " +
        std::to_string(limit) + "-byte limit" +
        (opted ? " the kernel opted in to"
               : " a block gets without opting in (GRU_SET_MAX_DYNAMIC_SMEM(kernel, bytes), "
                 "up to " + std::to_string(kMaxOptInSmemBytes) + " on sm_90)"));
  }
}

template <typename... KArgs, typename... Args>
void launch(const LaunchSite& at, void (*kernel)(KArgs...), dim3 grid, dim3 block,
            size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args), "kernel launched with the wrong arity");
  Config& cfg = config();
  std::lock_guard<std::mutex> one_launch_at_a_time(cfg.mu);
  check_configuration(at, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes);

  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nblocks = grid.x * grid.y * grid.z;
  const uint64_t seed = cfg.seed_set ? cfg.seed : env_u64("GRU_EMU_SEED", kDefaultSeed);
  const uint64_t launch_no = cfg.launches++;
  const std::vector<unsigned> order = block_order(seed, launch_no, nblocks);
  const uint64_t wave_threads = env_u64("GRU_EMU_WAVE_THREADS", kDefaultWaveThreads);
  const unsigned per_wave = static_cast<unsigned>(
      std::min<uint64_t>({std::max<uint64_t>(2, wave_threads / nthreads), 16, nblocks}));

  // The arguments are converted once, as a CUDA launch copies them; every thread gets
  // its own copy of the by-value parameters.
  const std::tuple<std::decay_t<KArgs>...> kargs(std::forward<Args>(args)...);
  const std::function<void()> body = [&] { std::apply(kernel, kargs); };

  while (cfg.fibers.size() < size_t(per_wave) * nthreads) {
    cfg.fibers.push_back(std::make_unique<Fiber>());
  }
  std::vector<ThreadState> threads(size_t(per_wave) * nthreads);
  std::vector<BlockRun> wave(per_wave);
  std::vector<std::unique_ptr<unsigned char, void (*)(void*)>> smem;
  for (unsigned w = 0; w < per_wave; ++w) smem.emplace_back(nullptr, std::free);

  for (unsigned first = 0; first < nblocks; first += per_wave) {
    const unsigned count = std::min(per_wave, nblocks - first);
    for (unsigned w = 0; w < count; ++w) {
      BlockRun& r = wave[w];
      const unsigned linear = order[first + w];
      r.idx = unflatten(linear, grid);
      r.threads = &threads[size_t(w) * nthreads];
      r.nthreads = nthreads;
      r.kernel = &body;
      r.order_state = hash64(seed ^ hash64(launch_no) ^ hash64(~uint64_t(linear)));
      r.failure.clear();
      smem[w].reset();
      if (smem_bytes > 0) {
        smem[w].reset(static_cast<unsigned char*>(std::malloc(smem_bytes)));
        if (!smem[w]) throw std::bad_alloc();
        std::memset(smem[w].get(), 0xFF, smem_bytes);
      }
      for (unsigned t = 0; t < nthreads; ++t) {
        ThreadState& ts = r.threads[t];
        ts.thread_idx = unflatten(t, block);
        ts.block_idx = r.idx;
        ts.block_dim = block;
        ts.grid_dim = grid;
        ts.smem = smem[w].get();
        ts.run = &r;
        ts.fiber = cfg.fibers[size_t(w) * nthreads + t].get();
      }
    }
    WorkerPool::instance().run(count, [&](unsigned w) { run_block(wave[w]); });
    for (unsigned w = 0; w < count; ++w) {
      if (!wave[w].failure.empty()) {
        throw std::runtime_error(wave[w].failure + " [launch of " + at.kernel + " at " +
                                 at.file + ":" + std::to_string(at.line) + ", grid " +
                                 to_string(grid) + ", block " + to_string(block) +
                                 ", GRU_EMU_SEED=" + std::to_string(seed) + ", launch " +
                                 std::to_string(launch_no) + "]");
      }
    }
  }
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
