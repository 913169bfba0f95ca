// Fuzzing the two loaders of untrusted files (tensor/npy.h, nn/safetensors.h) with seeded mutations of
// valid files: truncation, byte flips, inserted / deleted bytes and edits of the header fields (shapes,
// dtypes, offsets, lengths, huge numbers). Every load must either succeed with tensors whose bytes fit in
// the file, or throw a flexgrad error (fg::Error): never crash, never let a bare std:: exception out, and
// never read out of bounds, which the AddressSanitizer run of this suite (scripts/run_tests.sh) catches.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "flexgrad/nn/safetensors.h"
#include "flexgrad/tensor/npy.h"
#include "tests/test_util.h"

namespace fg::testing {
namespace {

using namespace fg::nn;
using Bytes = std::string;

Bytes read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_file(const std::string& path, const Bytes& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(b.data(), static_cast<std::streamsize>(b.size()));
}

struct Mutator {
  std::mt19937_64 rng;
  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
  template <class V> const auto& pick(const V& v) { return v[static_cast<size_t>(uniform(0, std::size(v) - 1))]; }

  // Values that break naive size arithmetic: 0, negatives, 2^31, 2^32, 2^62, 2^63 - 1, past int64 / uint64.
  std::string nasty_number() {
    static const char* vals[] = {"0", "1", "-1", "7", "255", "2147483648", "4294967296", "4294967297",
                                 "4611686018427387904", "9223372036854775807", "9223372036854775808",
                                 "18446744073709551615", "18446744073709551616", "99999999999999999999999999",
                                 "1.5", "1e30", "-9223372036854775808"};
    return pick(vals);
  }

  // Byte-level damage anywhere in the file.
  Bytes damage(Bytes b) {
    switch (uniform(0, 3)) {
      case 0: b.resize(static_cast<size_t>(uniform(0, static_cast<int64_t>(b.size())))); break;  // truncate
      case 1: {  // flip a few bytes
        const int64_t n = uniform(1, 8);
        for (int64_t i = 0; i < n && !b.empty(); ++i) b[uniform(0, b.size() - 1)] ^= static_cast<char>(uniform(1, 255));
        break;
      }
      case 2: {  // insert bytes
        const size_t at = static_cast<size_t>(uniform(0, b.size()));
        b.insert(at, Bytes(static_cast<size_t>(uniform(1, 16)), static_cast<char>(uniform(0, 255))));
        break;
      }
      default: {  // delete bytes
        if (b.empty()) break;
        const size_t at = static_cast<size_t>(uniform(0, b.size() - 1));
        b.erase(at, static_cast<size_t>(uniform(1, 16)));
      }
    }
    return b;
  }
};

// ---------------------------------------------------------------- .npy

// The header dict of a .npy file: after the magic (6), version (2) and the 2- or 4-byte length.
struct NpyParts {
  Bytes prefix;  // magic + version
  Bytes dict;    // as written, padding included
  Bytes data;
};

NpyParts split_npy(const Bytes& b) {
  const size_t len_size = b[6] == 1 ? 2 : 4;
  size_t n = 0;
  for (size_t i = len_size; i-- > 0;) n = n << 8 | static_cast<unsigned char>(b[8 + i]);
  return {b.substr(0, 8), b.substr(8 + len_size, n), b.substr(8 + len_size + n)};
}

Bytes join_npy(const NpyParts& p, std::optional<uint64_t> declared_len = std::nullopt) {
  const size_t len_size = p.prefix[6] == 1 ? 2 : 4;
  const uint64_t n = declared_len.value_or(p.dict.size());
  Bytes out = p.prefix;
  for (size_t i = 0; i < len_size; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xff));
  return out + p.dict + p.data;
}

// Replaces the value of `key` in the dict text (up to the next top-level ", '" or "}").
Bytes replace_field(const Bytes& dict, const std::string& key, const std::string& value) {
  const size_t k = dict.find("'" + key + "': ");
  if (k == Bytes::npos) return dict;
  const size_t v = k + key.size() + 4;
  size_t end = key == "shape" ? dict.find(')', v) + 1 : dict.find_first_of(",}", v);
  if (end == Bytes::npos || end < v) end = dict.size();
  return dict.substr(0, v) + value + dict.substr(end);
}

Bytes mutate_npy(Mutator& m, const Bytes& valid) {
  NpyParts p = split_npy(valid);
  switch (m.uniform(0, 5)) {
    case 0: return m.damage(valid);
    case 1: {  // a hostile shape
      std::string shape = "(";
      const int64_t rank = m.uniform(0, 3);
      for (int64_t d = 0; d < rank; ++d) shape += (m.uniform(0, 2) ? std::to_string(m.uniform(0, 9)) : m.nasty_number()) + ", ";
      if (m.uniform(0, 6) == 0) shape.pop_back();  // "(3," style: unterminated
      shape += ")";
      p.dict = replace_field(p.dict, "shape", shape);
      return join_npy(p);
    }
    case 2: {
      static const char* descrs[] = {"'<f4'", "'>f8'", "'|b1'", "'<i8'", "'<i4'", "'<f2'", "'<u4'", "'<c8'", "''",
                                     "'<f16'", "'|f4'", "'", "5", "'<f4", "'=f8'"};
      p.dict = replace_field(p.dict, "descr", m.pick(descrs));
      return join_npy(p);
    }
    case 3: {
      static const char* orders[] = {"True", "False", "true", "1", "Tru", ""};
      p.dict = replace_field(p.dict, "fortran_order", m.pick(orders));
      return join_npy(p);
    }
    case 4: {  // a header length that disagrees with the dict (up to 4 GiB in format 2.0)
      const uint64_t limit = p.prefix[6] == 1 ? 0xffff : 0xffffffffull;
      const uint64_t len = m.uniform(0, 1) ? static_cast<uint64_t>(m.uniform(0, 300)) : limit - m.uniform(0, 3);
      return join_npy(p, len);
    }
    default: {  // damage inside the dict only, keeping the length honest
      p.dict = m.damage(p.dict);
      return join_npy(p);
    }
  }
}

// The valid files: every dtype, ranks 0 to 3, C and Fortran order, format 1.0 and 2.0, big-endian data.
std::vector<Bytes> valid_npy_files() {
  std::vector<Bytes> out;
  const std::string p = scratch_path("fuzz_valid.npy");
  save_npy(p, from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3}, kFloat32));
  out.push_back(read_file(p));
  save_npy(p, from_vector<double>({1.5}, {}, kFloat64));
  out.push_back(read_file(p));
  save_npy(p, from_vector<int64_t>({1, -2, 3, 4, 5, 6, 7, 8}, {2, 2, 2}, kInt64));
  out.push_back(read_file(p));
  save_npy(p, from_vector<bool>({true, false, true}, {3}, kBool));
  out.push_back(read_file(p));
  save_npy(p, from_vector<int32_t>({}, {0, 4}, kInt32));
  out.push_back(read_file(p));
  save_npy(p, cast(from_vector<float>({0.5, 2, -1, 4}, {4}, kFloat32), kFloat16));
  out.push_back(read_file(p));
  // Fortran order, big-endian, format 2.0: rewrite the header of a saved file.
  NpyParts f = split_npy(out[0]);
  f.dict = replace_field(f.dict, "fortran_order", "True");
  out.push_back(join_npy(f));
  NpyParts be = split_npy(out[2]);
  be.dict = replace_field(be.dict, "descr", "'>i8'");
  out.push_back(join_npy(be));
  NpyParts v2 = split_npy(out[0]);
  v2.prefix[6] = 2;  // the 4-byte header length (the data lose their 64-byte alignment: allowed on load)
  out.push_back(join_npy(v2));
  return out;
}

// ---------------------------------------------------------------- safetensors

Bytes join_safetensors(const std::string& json, const Bytes& data, std::optional<uint64_t> declared_len = std::nullopt) {
  const uint64_t n = declared_len.value_or(json.size());
  Bytes out(8, '\0');
  for (size_t i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + json + data;
}

// Edits one field of one entry of the JSON header to a hostile value, as raw JSON text so that numbers past
// the int64 / uint64 range, floats and wrong types all reach the loader.
Bytes mutate_safetensors(Mutator& m, const Bytes& valid) {
  uint64_t n = 0;
  for (size_t i = 8; i-- > 0;) n = n << 8 | static_cast<unsigned char>(valid[i]);
  const std::string json = valid.substr(8, n);
  const Bytes data = valid.substr(8 + n);
  const int64_t kind = m.uniform(0, 5);
  if (kind == 0) return m.damage(valid);
  if (kind == 1) {  // the declared header length
    static const uint64_t lens[] = {0, 1, 7, 100u << 20, (100u << 20) + 1, ~uint64_t(0), uint64_t(1) << 63};
    return join_safetensors(json, data, m.uniform(0, 1) ? n + m.uniform(-9, 9) : m.pick(lens));
  }
  if (kind == 2) return join_safetensors(m.damage(json), data);
  nlohmann::ordered_json h = nlohmann::ordered_json::parse(json);
  std::vector<std::string> names;
  for (auto it = h.begin(); it != h.end(); ++it)
    if (it.key() != "__metadata__") names.push_back(it.key());
  const std::string name = m.pick(names);
  const std::string marker = "\"@@FUZZ@@\"";
  auto num = [&] { return m.uniform(0, 1) ? std::to_string(m.uniform(0, 64)) : m.nasty_number(); };
  std::string value;
  if (kind == 3) {  // shape
    const int64_t rank = m.uniform(0, 3);
    value = "[";
    for (int64_t d = 0; d < rank; ++d) value += (d ? "," : "") + num();
    value += "]";
    static const char* odd[] = {"\"3\"", "3", "[[2]]", "null", "[true]", "{}"};
    if (m.uniform(0, 5) == 0) value = m.pick(odd);
    h[name]["shape"] = nlohmann::ordered_json::parse(marker);
  } else if (kind == 4) {  // dtype
    static const char* dts[] = {"\"F32\"", "\"F64\"", "\"BOOL\"", "\"I64\"", "\"BF16\"", "\"U8\"", "\"F8_E4M3\"",
                                "\"f32\"", "\"\"", "32", "null", "[\"F32\"]"};
    value = m.pick(dts);
    h[name]["dtype"] = nlohmann::ordered_json::parse(marker);
  } else {  // data_offsets
    static const char* odd[] = {"[0]", "[0,4,8]", "[]", "\"0,4\"", "null", "[[0],[4]]", "[\"0\",\"4\"]"};
    value = m.uniform(0, 5) == 0 ? m.pick(odd) : "[" + num() + "," + num() + "]";
    h[name]["data_offsets"] = nlohmann::ordered_json::parse(marker);
  }
  std::string text = h.dump();
  text.replace(text.find(marker), marker.size(), value);
  return join_safetensors(text, data);
}

std::vector<Bytes> valid_safetensors_files() {
  std::vector<Bytes> out;
  const std::string p = scratch_path("fuzz_valid.safetensors");
  save_safetensors(p,
                   {{"w", from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3}, kFloat32)},
                    {"b", from_vector<double>({-1, 2}, {2}, kFloat64)},
                    {"i", from_vector<int64_t>({7}, {}, kInt64)}},
                   {{"format", "pt"}});
  out.push_back(read_file(p));
  save_safetensors(p, {{"m", from_vector<bool>({true, false, true, true}, {2, 2}, kBool)},
                       {"h", cast(from_vector<float>({1, 2}, {2}, kFloat32), kBFloat16)},
                       {"e", from_vector<int32_t>({}, {0, 3}, kInt32)}});
  out.push_back(read_file(p));
  return out;
}

// ---------------------------------------------------------------- the checks

struct Tally {
  int loaded = 0, rejected = 0;
};

// Runs one load; a bare std:: exception (or anything else) is a failure naming the seed.
template <class F> void expect_typed(F&& load, Tally& t, const std::string& what) {
  try {
    load();
    ++t.loaded;
  } catch (const fg::Error&) {
    ++t.rejected;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": escaped as an untyped std::exception: " << e.what();
  } catch (...) {
    ADD_FAILURE() << what << ": escaped as a non-std exception";
  }
}

// Reads every element (ASan sees an out-of-bounds read) and checks the bytes fit in the file.
void check_loaded(const Tensor& t, uint64_t file_size, const std::string& what) {
  const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
  EXPECT_LE(nbytes, file_size) << what << ": tensor " << shape_str(t.sizes()) << " holds more bytes than the file";
  EXPECT_EQ(t.to_vector().size(), static_cast<size_t>(t.numel())) << what;
}

// What the fuzzer found, as fixed probes: each used to escape as a bare std:: exception, to allocate what
// a damaged length field asked for, or to load bytes that are not values of the dtype.
TEST(LoaderFuzz, FoundByTheFuzzer) {
  const std::string npy = scratch_path("found.npy"), st = scratch_path("found.safetensors");
  NpyParts p = split_npy(valid_npy_files()[0]);
  // a shape size past int64 (std::stoll threw std::out_of_range)
  NpyParts huge = p;
  huge.dict = replace_field(huge.dict, "shape", "(99999999999999999999999,)");
  write_file(npy, join_npy(huge));
  EXPECT_THROW_MSG(load_npy(npy), IOError, "shape entry 99999999999999999999999 is past the int64 range");
  // format 2.0 with a header length of 4 GiB - 1 in a 100-byte file (was allocated before reading)
  NpyParts v2 = p;
  v2.prefix[6] = 2;
  write_file(npy, join_npy(v2, 0xffffffffu));
  EXPECT_THROW_MSG(load_npy(npy), IOError, "header length field says 4294967295 bytes");

  auto write_st = [&](const std::string& json, const Bytes& data) { write_file(st, join_safetensors(json, data)); };
  // JSON floats as sizes were truncated (1.5 -> 1) or cast past the integer range (1e30: undefined behaviour)
  write_st(R"({"w":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", Bytes(4, '\0'));
  EXPECT_THROW_MSG(load_safetensors(st), IOError, "tensor 'w' has a shape entry 1.5");
  write_st(R"({"w":{"dtype":"F32","shape":[1e30],"data_offsets":[0,4]}})", Bytes(4, '\0'));
  EXPECT_THROW_MSG(load_safetensors(st), IOError, "tensor 'w' has a shape entry 1e+30");
  write_st(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}})", Bytes(4, '\0'));
  EXPECT_THROW_MSG(load_safetensors(st), IOError, "tensor 'w' has a data_offsets entry 4.0");
  // negative sizes wrapped to huge unsigned ones
  write_st(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", Bytes(4, '\0'));
  EXPECT_THROW_MSG(load_safetensors(st), IOError, "tensor 'w' has a data_offsets entry -4");
  // a BOOL byte that is neither 0 nor 1 loaded, and reading it was undefined behaviour (UBSan: "load of value 32")
  write_st(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", Bytes("\x01\x20\x00", 3));
  EXPECT_THROW_MSG(load_safetensors(st), IOError, "BOOL tensor 'm' element 1 has byte value 32");
  write_st(R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})", Bytes("\x01\x00\x01", 3));
  EXPECT_EQ(load_safetensors(st).tensors.at(0).second.to_vector(), (std::vector<double>{1, 0, 1}));
}

TEST(LoaderFuzz, MalformedNpyFilesLoadOrRaiseTypedErrors) {
  const std::vector<Bytes> valid = valid_npy_files();
  const std::string path = scratch_path("fuzz.npy");
  for (const Bytes& v : valid) {  // the seeds themselves are valid
    write_file(path, v);
    EXPECT_NO_THROW(load_npy(path));
  }
  Tally tally;
  for (uint64_t seed = 1; seed <= 3000; ++seed) {
    Mutator m{std::mt19937_64(seed)};
    const Bytes bytes = mutate_npy(m, valid[seed % valid.size()]);
    write_file(path, bytes);
    const std::string what = "npy seed " + std::to_string(seed);
    expect_typed([&] { check_loaded(load_npy(path), bytes.size(), what); }, tally, what);
    if (::testing::Test::HasFailure()) {
      write_file(scratch_path("fuzz_failing.npy"), bytes);
      FAIL() << what << " failed; the file is " << scratch_path("fuzz_failing.npy");
    }
  }
  std::cout << "[  INFO    ] npy: " << tally.loaded << " mutated files loaded, " << tally.rejected << " rejected\n";
  // the mutations reach both outcomes (many data-only flips still load; header damage is rejected)
  EXPECT_GT(tally.loaded, 200);
  EXPECT_GT(tally.rejected, 1500);
}

TEST(LoaderFuzz, MalformedSafetensorsFilesLoadOrRaiseTypedErrors) {
  const std::vector<Bytes> valid = valid_safetensors_files();
  const std::string path = scratch_path("fuzz.safetensors");
  Tally tally;
  for (uint64_t seed = 1; seed <= 3000; ++seed) {
    Mutator m{std::mt19937_64(seed)};
    const Bytes bytes = mutate_safetensors(m, valid[seed % valid.size()]);
    write_file(path, bytes);
    const std::string what = "safetensors seed " + std::to_string(seed);
    expect_typed(
        [&] {
          SafetensorsFile f = load_safetensors(path);
          uint64_t total = 0;
          for (const auto& [name, t] : f.tensors) {
            check_loaded(t, bytes.size(), what + " tensor '" + name + "'");
            total += static_cast<uint64_t>(t.numel()) * t.element_size();
          }
          EXPECT_LE(total, bytes.size()) << what << ": the tensors together hold more bytes than the file";
        },
        tally, what);
    if (::testing::Test::HasFailure()) {
      write_file(scratch_path("fuzz_failing.safetensors"), bytes);
      FAIL() << what << " failed; the file is " << scratch_path("fuzz_failing.safetensors");
    }
  }
  std::cout << "[  INFO    ] safetensors: " << tally.loaded << " mutated files loaded, " << tally.rejected
            << " rejected\n";
  EXPECT_GT(tally.loaded, 100);
  EXPECT_GT(tally.rejected, 1500);
}

}  // namespace
}  // namespace fg::testing
