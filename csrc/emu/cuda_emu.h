// A small CUDA emulation layer: runs the project's CUDA kernels on the CPU, so that the
// test suite executes them on machines without a GPU, under AddressSanitizer and
// ThreadSanitizer too.
//
// Supported (and all the kernels may use): __global__/__device__/__host__ functions,
// threadIdx/blockIdx/blockDim/gridDim, __syncthreads(), per-block dynamic shared memory
// (GRU_DYNAMIC_SMEM), and launches through GRU_LAUNCH. No warp intrinsics, no static
// __shared__ arrays, no grid-wide barrier: the kernels do not use them.
//
// Model: each block runs with one OS thread per CUDA thread (blocks one after another;
// the threads come from a pool kept for the process),
// so a missing barrier is a real data race that ThreadSanitizer reports. The barrier is
// a mutex + condition variable, whose happens-before edges sanitizers understand. A
// thread that returns leaves the barrier, as exited threads do on the GPU. Shared memory
// is a malloc of exactly the launch's size, filled with 0xFF bytes (NaN for floats), so
// overruns hit AddressSanitizer's redzones and reads of unwritten shared memory turn
// results into NaN.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

namespace gru_emu {

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using stream_t = void*;

class BlockBarrier {
 public:
  explicit BlockBarrier(unsigned count) : expected_(count) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = generation_;
    if (++arrived_ == expected_) {
      release();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

  // A thread that has returned from the kernel no longer takes part.
  void drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --expected_;
    if (arrived_ > 0 && arrived_ == expected_) release();
  }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  unsigned expected_;
  unsigned arrived_ = 0;
  uint64_t generation_ = 0;
};

// The per-thread view of the launch, read by the kernels through the CUDA names below.
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  BlockBarrier* barrier = nullptr;
  unsigned char* smem = nullptr;
};
inline thread_local ThreadState tls;

inline void syncthreads() {
  if (tls.barrier == nullptr) throw std::logic_error("__syncthreads() outside a kernel");
  tls.barrier->arrive_and_wait();
}

// Worker threads that play the CUDA threads of one block at a time. Kept for the whole
// process: creating hundreds of OS threads per launch would dominate the tests' time.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }

  // Runs job(id) for id in [0, n), each on its own thread, and returns when all are done.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    std::unique_lock<std::mutex> lock(mu_);
    while (workers_.size() < n) {
      const unsigned id = static_cast<unsigned>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &job;
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    start_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void loop(unsigned id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(unsigned)>* job = nullptr;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (id >= active_) continue;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--remaining_ == 0) done_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned active_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes,
            Args... args) {
  const unsigned nthreads = block.x * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024) {
    throw std::invalid_argument("emulated launch: block of " + std::to_string(nthreads) +
                                " threads (CUDA allows 1..1024)");
  }
  static std::mutex one_launch_at_a_time;
  std::lock_guard<std::mutex> guard(one_launch_at_a_time);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        BlockBarrier barrier(nthreads);
        unsigned char* smem = nullptr;
        if (smem_bytes > 0) {
          smem = static_cast<unsigned char*>(std::malloc(smem_bytes));
          std::memset(smem, 0xFF, smem_bytes);
        }
        WorkerPool::instance().run(nthreads, [&](unsigned id) {
          const dim3 tid(id % block.x, (id / block.x) % block.y, id / (block.x * block.y));
          tls = ThreadState{tid, dim3(bx, by, bz), block, grid, &barrier, smem};
          kernel(args...);
          barrier.drop();
          tls = ThreadState{};
        });
        std::free(smem);
      }
}

}  // namespace gru_emu

using gru_emu::dim3;
#define threadIdx (gru_emu::tls.thread_idx)
#define blockIdx (gru_emu::tls.block_idx)
#define blockDim (gru_emu::tls.block_dim)
#define gridDim (gru_emu::tls.grid_dim)
#define __syncthreads() gru_emu::syncthreads()
