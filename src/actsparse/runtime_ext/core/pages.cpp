// to_huge_pages: a weight tensor's bytes moved onto 2 MB pages where they are (see actsparse_core.hpp).
#include <cstdlib>
#include <cstring>

#include "actsparse_core.hpp"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace actsparse {

void to_huge_pages(const void* p, size_t bytes) {
#ifdef __linux__
  const char* env = std::getenv("ACTSPARSE_HUGE_PAGES");
  if (env && std::strcmp(env, "0") == 0) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1), hi = (a + bytes) & ~(kHuge - 1);
  if (hi <= lo) return;
  const size_t n = hi - lo;
  // 2 MB-aligned anonymous memory: over-allocate, then trim both ends
  void* m = mmap(nullptr, n + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) return;
  const auto base = reinterpret_cast<uintptr_t>(m), d = (base + kHuge - 1) & ~(kHuge - 1);
  if (d > base) munmap(m, d - base);
  if (base + n + kHuge > d + n) munmap(reinterpret_cast<void*>(d + n), base + n + kHuge - (d + n));
  auto* dst = reinterpret_cast<void*>(d);
  madvise(dst, n, MADV_HUGEPAGE);
  std::memcpy(dst, reinterpret_cast<const void*>(lo), n);
  // Atomically replaces the old pages at [lo, hi) (unmapping them: RSS keeps one copy) with the same bytes.
  // Writable, like any heap memory: the range may go back to an allocator (ONNX Runtime's) later.
  if (mremap(dst, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, reinterpret_cast<void*>(lo)) == MAP_FAILED) munmap(dst, n);
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace actsparse
