// A CPU allocator that keeps freed large blocks for the next allocation of the same size.
//
// glibc maps every block above its mmap threshold (16 MiB under lorakit.host_memory) afresh and
// hands it back when freed, so the kernel zeroes its pages again on first touch: at 7B layer shapes
// (4,096-token activations of 32 and 112 MiB) about a million page faults and 1-3 s of a 19 s step
// on the benchmark machine. Serving those blocks from the heap instead leaves holes that grew the
// peak by 0.65-1.15 GiB (docs/benchmarks.md). A training step asks for the same few large sizes
// every step, so this allocator keeps a freed block for the next request of exactly its size, and
// holds no more than the step itself needed at once: before a request that finds no block of its
// size is served fresh, kept blocks of other sizes are given back until the large blocks held,
// live and kept, fit under the most that were ever live together.
//
// Smaller requests go to the allocator that was in place before, untouched.
//
// Registered as torch.ops.lorakit_cpu.cache_large_blocks(min_bytes) (installs it, once) and
// large_block_stats() -> [hits, misses, live bytes, kept bytes, peak live bytes].
#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

class LargeBlockCache final : public c10::Allocator {
 public:
  static LargeBlockCache& instance() {
    static LargeBlockCache* cache = new LargeBlockCache();  // never destroyed: blocks outlive exit order
    return *cache;
  }

  // Installs the cache in front of the current CPU allocator; later calls change nothing.
  bool install(int64_t min_bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    if (base_ == nullptr) {
      TORCH_CHECK(min_bytes > 0, "min_bytes must be positive");
      min_bytes_ = static_cast<size_t>(min_bytes);
      base_ = c10::GetCPUAllocator();
      base_deleter_ = base_->raw_deleter();
      c10::SetCPUAllocator(this, /*priority=*/255);
    }
    return true;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_) return base_->allocate(n);
    void* p = nullptr;
    std::vector<void*> released;  // given back outside the lock
    {
      std::lock_guard<std::mutex> guard(mutex_);
      auto kept = kept_.find(n);
      if (kept != kept_.end() && !kept->second.empty()) {
        p = kept->second.back();
        kept->second.pop_back();
        kept_bytes_ -= n;
        ++hits_;
      } else {
        // Make room first: what is held never exceeds the most that was live at once.
        for (auto size = kept_.rbegin(); size != kept_.rend() && live_bytes_ + kept_bytes_ + n > peak_live_bytes_;) {
          if (size->second.empty()) {
            ++size;
            continue;
          }
          released.push_back(size->second.back());
          size->second.pop_back();
          kept_bytes_ -= size->first;
        }
        ++misses_;
      }
      live_bytes_ += n;
      peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
    }
    for (void* block : released) c10::free_cpu(block);
    if (p == nullptr) {
      try {
        p = c10::alloc_cpu(n);
      } catch (...) {
        std::lock_guard<std::mutex> guard(mutex_);
        live_bytes_ -= n;
        throw;
      }
    }
    {
      std::lock_guard<std::mutex> guard(mutex_);
      sizes_[p] = n;
    }
    c10::profiledCPUMemoryReporter().New(p, n);  // as torch's own CPU allocator reports, for the profiler
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {hits_, misses_, static_cast<int64_t>(live_bytes_), static_cast<int64_t>(kept_bytes_),
            static_cast<int64_t>(peak_live_bytes_)};
  }

 private:
  // The deleter of every block this allocator hands out, and its raw deleter: a pointer it did not
  // hand out (a small block raw_allocate'd through it) goes to the previous allocator's.
  static void release(void* p) {
    LargeBlockCache& cache = instance();
    {
      std::lock_guard<std::mutex> guard(cache.mutex_);
      auto entry = cache.sizes_.find(p);
      if (entry != cache.sizes_.end()) {
        const size_t n = entry->second;
        cache.sizes_.erase(entry);
        // reported freed before another request can take it again
        c10::profiledCPUMemoryReporter().Delete(p);
        cache.live_bytes_ -= n;
        cache.kept_[n].push_back(p);
        cache.kept_bytes_ += n;
        return;
      }
    }
    cache.base_deleter_(p);
  }

  std::mutex mutex_;
  c10::Allocator* base_ = nullptr;
  c10::DeleterFnPtr base_deleter_ = nullptr;
  size_t min_bytes_ = SIZE_MAX;
  std::unordered_map<void*, size_t> sizes_;    // blocks handed out, by pointer
  std::map<size_t, std::vector<void*>> kept_;  // freed blocks, by size (released largest first)
  size_t live_bytes_ = 0, kept_bytes_ = 0, peak_live_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

bool cache_large_blocks(int64_t min_bytes) { return LargeBlockCache::instance().install(min_bytes); }

std::vector<int64_t> large_block_stats() { return LargeBlockCache::instance().stats(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorakit_cpu, m) {
  m.def("cache_large_blocks(int min_bytes) -> bool");
  m.def("large_block_stats() -> int[]");
}

TORCH_LIBRARY_IMPL(lorakit_cpu, CatchAll, m) {
  m.impl("cache_large_blocks", &cache_large_blocks);
  m.impl("large_block_stats", &large_block_stats);
}
