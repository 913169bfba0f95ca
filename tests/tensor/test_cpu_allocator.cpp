// The CPU caching allocator: large freed blocks are reused by size class, small ones are not cached,
// statistics add up, and empty_cache / the cache limit give memory back.
#include "tests/test_util.h"

namespace fg {
namespace {

TEST(CpuAllocator, LargeBlocksAreReusedBySizeClass) {
  cpu_empty_cache();
  void* first;
  {
    Tensor a = empty({1 << 20}, kFloat32);  // 4 MiB
    first = a.data_ptr();
  }
  CpuAllocatorStats s = cpu_allocator_stats();
  EXPECT_GE(s.cached_bytes, size_t{4} << 20);
  size_t hits = s.cache_hits;
  Tensor b = empty({(1 << 20) - 100}, kFloat32);  // same size class
  EXPECT_EQ(b.data_ptr(), first);
  EXPECT_EQ(cpu_allocator_stats().cache_hits, hits + 1);
  Tensor c = empty({1 << 20}, kFloat32);  // the cached block is taken: a new one
  EXPECT_NE(c.data_ptr(), first);
}

TEST(CpuAllocator, SmallBlocksAreNotCachedAndStatsBalance) {
  cpu_empty_cache();
  size_t live = cpu_allocator_stats().allocated_bytes;
  {
    Tensor small = empty({100}, kFloat32);
    Tensor large = empty({1 << 18}, kFloat64);
    EXPECT_GE(cpu_allocator_stats().allocated_bytes, live + (size_t{2} << 20));
  }
  CpuAllocatorStats s = cpu_allocator_stats();
  EXPECT_EQ(s.allocated_bytes, live);
  EXPECT_GE(s.cached_bytes, size_t{2} << 20);
  cpu_empty_cache();
  EXPECT_EQ(cpu_allocator_stats().cached_bytes, 0u);
}

TEST(CpuAllocator, CacheLimitIsRespected) {
  set_cpu_cache_limit(size_t{1} << 20);
  { Tensor big = empty({1 << 20}, kFloat32); }  // 4 MiB > limit: freed to the system
  EXPECT_EQ(cpu_allocator_stats().cached_bytes, 0u);
  set_cpu_cache_limit(size_t{2} << 30);
}

TEST(CpuAllocator, ReusedMemoryIsNotAssumedZero) {
  cpu_empty_cache();
  { Tensor a = full({1 << 18}, 7.0, kFloat32); }
  Tensor z = zeros({1 << 18}, kFloat32);  // takes the cached block and must still be zeroed
  EXPECT_EQ(amax(abs(z)).item(), 0.0);
}

}  // namespace
}  // namespace fg
