// A persistent worker pool for the kernels. OpenMP regions opened from a thread other
// than the process's first cost ~50 us each here (the engine runs on such a thread), more
// than a whole GEMV; these workers stay alive, spin briefly between jobs, then sleep.
// Work is handed out in chunks from an atomic counter: which thread computes an output
// never changes its bits (each output is computed whole by one thread).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tierlm {

class Pool {
   public:
    explicit Pool(int threads) {
        for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { loop(); });
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
    }
    int size() const { return (int)workers_.size() + 1; }

    // fn(begin, end) over [0, n) in chunks of `grain`, on the caller and every worker.
    void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
        if (workers_.empty() || n <= grain) {
            fn(0, n);
            return;
        }
        std::lock_guard<std::mutex> one_job(job_mutex_);  // callers from several threads take turns
        fn_ = &fn;
        n_ = n;
        grain_ = grain;
        next_.store(0);
        pending_.store((int)workers_.size());
        {
            std::lock_guard<std::mutex> lock(mutex_);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        work();
        while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
        fn_ = nullptr;
    }

   private:
    void work() {
        for (;;) {
            const int64_t begin = next_.fetch_add(grain_);
            if (begin >= n_) return;
            (*fn_)(begin, std::min(n_, begin + grain_));
        }
    }

    void loop() {
        uint64_t seen = 0;  // the generation at construction: a job published before this
                            // thread got going is still seen as new
        for (;;) {
            // Spin a little (the next layer's product comes within microseconds), then sleep.
            int spins = 0;
            while (generation_.load(std::memory_order_acquire) == seen && spins < (1 << 16)) {
                _mm_pause();
                ++spins;
            }
            if (generation_.load(std::memory_order_acquire) == seen) {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return generation_.load() != seen; });
            }
            seen = generation_.load(std::memory_order_acquire);
            if (stop_) return;
            work();
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mutex_, job_mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_{0};
    std::atomic<int> pending_{0};
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, grain_ = 1;
    bool stop_ = false;
};

}  // namespace tierlm
