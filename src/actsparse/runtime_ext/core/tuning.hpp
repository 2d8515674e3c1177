#pragma once
// Internal: the decode knobs as the library loaded them (tuning.cpp), for dispatch.cpp.
#include <string>

#include "actsparse_core.hpp"

namespace actsparse {
namespace detail {

constexpr int kKnobCount = 5;  // Tuning's fields, in order

struct LoadedTuning {
  Tuning tuning;
  Tuning fallback;                 // the rules and defaults alone, without the file or environment
  const char* source[kKnobCount];  // "env", "file", "rule" or "default"
  std::string cpu, kernel, file;   // the file's key and path ("" without $ACTSPARSE_CACHE or $HOME)
  std::string ignored;             // why an existing file was not used
  bool used = false;
  int threads = 0;                 // the thread count the file was measured with
};

const LoadedTuning& loaded_tuning();  // read once, on first use
void check_tuning(const Tuning& t);   // std::invalid_argument for a value out of range

}  // namespace detail
}  // namespace actsparse
