// The decode knobs' starting values: environment, else the tuning file for this CPU, else rules and defaults.
#include <cstdio>
#include <cstdlib>
#include <cctype>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <unistd.h>

#include "tuning.hpp"

namespace actsparse {
namespace detail {
namespace {

const char* const kKnobs[kKnobCount] = {"par_bytes", "split", "prefetch", "decode_max_rows", "union_pct"};

// The first processor's model name, with its family and model where /proc/cpuinfo gives them: VMs name Zen 4 and
// Zen 5 alike ("AMD EPYC"), and a tuning measured on one must not apply to the other. The format is the
// benchmarks' (_harness.machine).
std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string name, family, model;
  for (std::string line; std::getline(in, line) && !line.empty();) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const size_t a = line.find_first_not_of(" \t", colon + 1), b = line.find_last_not_of(" \t", colon - 1);
    const std::string key = b == std::string::npos ? "" : line.substr(0, b + 1);
    const std::string value = a == std::string::npos ? "" : line.substr(a);
    if (key == "model name") name = value;
    else if (key == "cpu family") family = value;
    else if (key == "model") model = value;
  }
  if (name.empty()) return "unknown";
  return family.empty() || model.empty() ? name : name + " (family " + family + ", model " + model + ")";
}

// Sets knob `name` of t from text, or throws std::invalid_argument saying why not.
void parse_knob(const std::string& name, const std::string& text, Tuning& t) {
  if (name == "split") {
    if (text.size() > 1) throw std::invalid_argument("split must be n, k or empty");
    t.split = text.empty() ? '\0' : text[0];
  } else if (name == "prefetch") {
    if (text != "l1" && text != "l2") throw std::invalid_argument("prefetch must be l1 or l2");
    t.prefetch_l2 = text == "l2";
  } else {
    char* end = nullptr;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end) throw std::invalid_argument(name + " must be an integer, got '" + text + "'");
    (name == "par_bytes" ? t.par_bytes : name == "decode_max_rows" ? t.decode_max_rows : t.union_pct) = v;
  }
  check_tuning(t);
}

int knob_index(const std::string& name) {
  for (int i = 0; i < kKnobCount; ++i)
    if (name == kKnobs[i]) return i;
  return -1;
}

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r"), b = s.find_last_not_of(" \t\r");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// Reads the tuning file into t (knobs it sets marked "file"), or returns why it is ignored ("" when used).
std::string read_file(const std::string& path, LoadedTuning& l) {
  std::ifstream in(path);
  if (!in) return "cannot be read";
  Tuning t = l.tuning;
  const char* source[kKnobCount];
  std::copy(l.source, l.source + kKnobCount, source);
  const std::string expect[] = {"cpu=" + l.cpu, "kernel=" + l.kernel, "version=" + std::to_string(kTuningVersion)};
  int keys = 0, number = 0;
  try {
    for (std::string line; std::getline(in, line);) {
      line = trim(line);
      ++number;
      if (line.empty() || line[0] == '#') continue;
      const size_t eq = line.find('=');
      if (eq == std::string::npos) return "line " + std::to_string(number) + " has no '='";
      const std::string key = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
      if (key == "cpu" || key == "kernel" || key == "version") {
        if (key + "=" + value != expect[key == "cpu" ? 0 : key == "kernel" ? 1 : 2])
          return "written for " + key + " " + value;
        ++keys;
      } else if (key == "threads") {
        l.threads = std::atoi(value.c_str());
      } else if (knob_index(key) >= 0) {
        parse_knob(key, value, t);
        source[knob_index(key)] = "file";
      } else {
        return "unknown key " + key;
      }
    }
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  if (keys != 3) return "no cpu, kernel or version line";
  l.tuning = t;
  std::copy(source, source + kKnobCount, l.source);
  return "";
}

LoadedTuning load() {
  LoadedTuning l;
  // Decode prefetches into L1 one group ahead where L1D holds 48 KB or more, else into L2 four groups ahead,
  // whose L1 the prefetches thrash (docs/op.md).
  const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE);
  l.tuning = {128 << 10, '\0', l1d > 0 && l1d < 48 * 1024, 16, 125};
  std::fill(l.source, l.source + kKnobCount, "default");
  if (l1d > 0) l.source[2] = "rule";
  l.fallback = l.tuning;
  l.cpu = cpu_model();
  l.kernel = best_kernel();
  std::string name = l.cpu + "_" + l.kernel + "_v" + std::to_string(kTuningVersion);
  for (char& c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_') c = '-';
  const char* root = std::getenv("ACTSPARSE_CACHE");
  const char* home = std::getenv("HOME");
  if ((root && *root) || (home && *home))
    l.file = (root && *root ? std::string(root) : std::string(home) + "/.cache/actsparse") + "/tuning/" + name + ".txt";
  if (!l.file.empty() && access(l.file.c_str(), F_OK) == 0) {
    l.ignored = read_file(l.file, l);
    for (char& c : l.ignored)  // the file's bytes may be anything
      if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) c = '?';
    l.used = l.ignored.empty();
    if (!l.used) std::fprintf(stderr, "actsparse: ignoring the tuning file %s: %s\n", l.file.c_str(), l.ignored.c_str());
  }
  for (int i = 0; i < kKnobCount; ++i) {
    std::string env = std::string("ACTSPARSE_") + kKnobs[i];
    for (char& c : env) c = char(std::toupper(static_cast<unsigned char>(c)));
    const char* v = std::getenv(env.c_str());
    if (!v || !*v) continue;
    try {
      parse_knob(kKnobs[i], v, l.tuning);
      l.source[i] = "env";
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "actsparse: ignoring $%s: %s\n", env.c_str(), e.what());
    }
  }
  return l;
}

std::string json_string(const std::string& s) {
  std::string j = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') j += '\\';
    if (static_cast<unsigned char>(c) >= 0x20) j += c;
  }
  return j + "\"";
}

}  // namespace

const LoadedTuning& loaded_tuning() {
  static const LoadedTuning l = load();
  return l;
}

void check_tuning(const Tuning& t) {
  if (t.split != '\0' && t.split != 'n' && t.split != 'k') throw std::invalid_argument("split must be n, k or empty");
  if (t.par_bytes < 0) throw std::invalid_argument("par_bytes must be >= 0");
  if (t.decode_max_rows < 1 || t.decode_max_rows > 256) throw std::invalid_argument("decode_max_rows must be 1 to 256");
  if (t.union_pct < 0 || t.union_pct > 10000) throw std::invalid_argument("union_pct must be 0 to 10000");
}

}  // namespace detail

std::string tuning_report() {
  const detail::LoadedTuning& l = detail::loaded_tuning();
  const Tuning now = tuning(), then = l.tuning;
  auto values = [](const Tuning& t) {
    return std::vector<std::string>{std::to_string(t.par_bytes), detail::json_string(t.split ? std::string(1, t.split) : ""),
                                    t.prefetch_l2 ? "\"l2\"" : "\"l1\"", std::to_string(t.decode_max_rows),
                                    std::to_string(t.union_pct)};
  };
  const std::vector<std::string> value = values(now), fallback = values(l.fallback);
  const bool changed[] = {now.par_bytes != then.par_bytes, now.split != then.split, now.prefetch_l2 != then.prefetch_l2,
                          now.decode_max_rows != then.decode_max_rows, now.union_pct != then.union_pct};
  std::string j = "{\"knobs\":{";
  for (int i = 0; i < detail::kKnobCount; ++i)
    j += std::string(i ? "," : "") + "\"" + detail::kKnobs[i] + "\":{\"value\":" + value[i] + ",\"source\":\"" +
         (changed[i] ? "set_tuning" : l.source[i]) + "\",\"fallback\":" + fallback[i] + "}";
  return j + "},\"file\":" + (l.file.empty() ? "null" : detail::json_string(l.file)) + ",\"file_used\":" +
         (l.used ? "true" : "false") + ",\"file_ignored\":" + (l.ignored.empty() ? "null" : detail::json_string(l.ignored)) +
         ",\"threads_measured\":" + (l.threads ? std::to_string(l.threads) : "null") + ",\"cpu\":" +
         detail::json_string(l.cpu) + ",\"kernel\":" + detail::json_string(l.kernel) +
         ",\"version\":" + std::to_string(kTuningVersion) + "}";
}

}  // namespace actsparse
