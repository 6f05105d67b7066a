// The process's one worker pool for the kernels (llama.cpp keeps its own for the same
// reason). OpenMP regions cost ~50-70 us each once two threads own OpenMP teams (libgomp
// then stops spinning: measured here, the server's engine thread beside the main one),
// more than a whole GEMV. These workers stay alive, spin for `spin_us` after a job (the
// next layer's product comes within microseconds), then sleep; torch's own intra-op
// threads are set to 1 while the kernels run a model, so the two never contend.
// Work is handed out in chunks from an atomic counter: which thread computes an output
// never changes its bits (each output is computed whole by one thread).
#pragma once

#include <immintrin.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tierlm {

class Pool {
   public:
    explicit Pool(int threads) { start(threads); }
    ~Pool() { stop(); }
    int size() const { return (int)workers_.size() + 1; }

    // `threads` in all (the caller counts as one); waits for a running job first.
    void resize(int threads) {
        std::lock_guard<std::mutex> one_job(job_mutex_);
        stop();
        start(threads);
    }
    void set_spin_us(int64_t us) { spin_us_.store(us); }

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
    void start(int threads) {
        stop_ = false;
        const uint64_t now = generation_.load();  // a job published after this is new to them
        for (int i = 1; i < threads; ++i) workers_.emplace_back([this, now] { loop(now); });
    }
    void stop() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stop_ = true;
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    void work() {
        for (;;) {
            const int64_t begin = next_.fetch_add(grain_);
            if (begin >= n_) return;
            (*fn_)(begin, std::min(n_, begin + grain_));
        }
    }

    void loop(uint64_t seen) {
        for (;;) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_.load());
            for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
                _mm_pause();
                if ((spins & 63) == 63 && std::chrono::steady_clock::now() >= until) break;
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
    std::atomic<int64_t> spin_us_{100};
    const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
    int64_t n_ = 0, grain_ = 1;
    std::atomic<bool> stop_{false};
};

// The process's pool (one thread until `resize`); shared by every kernel file.
inline Pool& pool() {
    static Pool p(1);
    return p;
}

}  // namespace tierlm
