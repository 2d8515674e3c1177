// ThreadExecutor: a small persistent pool. Workers spin briefly before sleeping because decode calls
// arrive back to back and last tens of microseconds; a futex wake-up per call would dominate them.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

#include "actsparse_core.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ACTSPARSE_PAUSE() _mm_pause()
#else
#define ACTSPARSE_PAUSE() std::this_thread::yield()
#endif

namespace actsparse {

namespace {
// One job per parallel() call. The caller waits for tasks to finish, not for workers to show up: on an
// oversubscribed machine a descheduled worker must not hold the call; if it wakes late it finds the
// job's counter exhausted and touches nothing else.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t ntasks;
  std::atomic<int64_t> next{0}, done{0};
  std::exception_ptr error;
  std::mutex error_m;

  void run() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) {
      try {
        (*fn)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lk(error_m);
        if (!error) error = std::current_exception();
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};
}  // namespace

struct ThreadExecutor::Pool {
  int threads = 1;
  std::vector<std::thread> workers;
  std::mutex submit;  // one parallel() in flight
  std::mutex m;       // guards job, stop, sleepers
  std::condition_variable cv;
  std::shared_ptr<Job> job;
  int sleepers = 0;
  bool stop = false;
  std::atomic<uint64_t> gen{0};

  void worker() {
    uint64_t seen = 0;
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; gen.load(std::memory_order_acquire) == seen; ++i) {
        ACTSPARSE_PAUSE();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(200)) {
          std::unique_lock<std::mutex> lk(m);
          ++sleepers;
          cv.wait(lk, [&] { return gen.load(std::memory_order_acquire) != seen; });
          --sleepers;
          break;
        }
      }
      std::shared_ptr<Job> j;
      {
        std::lock_guard<std::mutex> lk(m);
        if (stop) return;
        seen = gen.load(std::memory_order_acquire);
        j = job;
      }
      if (j) j->run();
    }
  }
};

ThreadExecutor::ThreadExecutor(int threads) : pool_(new Pool) {
  pool_->threads = threads < 1 ? 1 : threads;
  for (int i = 1; i < pool_->threads; ++i) pool_->workers.emplace_back([p = pool_.get()] { p->worker(); });
}

ThreadExecutor::~ThreadExecutor() {
  {
    std::lock_guard<std::mutex> lk(pool_->m);
    pool_->stop = true;
    pool_->gen.fetch_add(1, std::memory_order_acq_rel);
  }
  pool_->cv.notify_all();
  for (auto& t : pool_->workers) t.join();
}

int ThreadExecutor::concurrency() const { return pool_->threads; }

void ThreadExecutor::parallel(int64_t ntasks, const std::function<void(int64_t)>& fn) const {
  Pool& p = *pool_;
  if (ntasks <= 0) return;
  if (ntasks == 1 || p.workers.empty()) {
    for (int64_t t = 0; t < ntasks; ++t) fn(t);
    return;
  }
  std::lock_guard<std::mutex> guard(p.submit);
  auto j = std::make_shared<Job>();
  j->fn = &fn;
  j->ntasks = ntasks;
  int sleepers;
  {
    std::lock_guard<std::mutex> lk(p.m);
    p.job = j;
    p.gen.fetch_add(1, std::memory_order_acq_rel);
    sleepers = p.sleepers;
  }
  if (sleepers) p.cv.notify_all();
  j->run();
  for (int i = 0; j->done.load(std::memory_order_acquire) != ntasks; ++i) {
    if (i < 4096) ACTSPARSE_PAUSE();
    else std::this_thread::yield();
  }
  {
    std::lock_guard<std::mutex> lk(p.m);
    p.job.reset();  // fn dies with this call; late workers then find no job
  }
  if (j->error) std::rethrow_exception(j->error);
}

}  // namespace actsparse
