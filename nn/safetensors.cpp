#include "flexgrad/nn/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "flexgrad/ops/elementwise.h"

namespace fg::nn {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

const char* st_dtype(DType d) {
  switch (d) {
    case kFloat64: return "F64";
    case kFloat32: return "F32";
    case kFloat16: return "F16";
    case kBFloat16: return "BF16";
    case kInt64: return "I64";
    case kInt32: return "I32";
    case kBool: return "BOOL";
    default: break;
  }
  FG_FAIL(DTypeError, "save_safetensors: dtype {} has no safetensors name", d);
}

bool parse_dtype(const std::string& s, DType& out) {
  static const std::map<std::string, DType> names{{"F64", kFloat64}, {"F32", kFloat32}, {"F16", kFloat16},
                                                  {"BF16", kBFloat16}, {"I64", kInt64}, {"I32", kInt32},
                                                  {"BOOL", kBool}};
  auto it = names.find(s);
  if (it == names.end()) return false;
  out = it->second;
  return true;
}

// A shape entry or data offset as the format's unsigned integer. JSON floats, negatives and values past
// `max` are malformed (nlohmann's get<> would truncate a float, wrap a negative, or cast a float past the
// integer range: undefined behaviour).
uint64_t json_uint(const nlohmann::json& v, uint64_t max, const std::string& path, const std::string& name,
                   const char* field) {
  FG_CHECK(v.is_number_unsigned() && v.get<uint64_t>() <= max, IOError,
           "load_safetensors: '{}': tensor '{}' has {} entry {}, expected a non-negative integer up to {}", path, name,
           field, v.dump(), max);
  return v.get<uint64_t>();
}

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<Tensor> host;
  uint64_t offset = 0;
  std::map<std::string, int> seen;
  for (const auto& [name, t] : tensors) {
    FG_CHECK(t.defined(), ValueError, "save_safetensors: tensor '{}' is undefined", name);
    FG_CHECK(name != "__metadata__" && seen[name]++ == 0, ValueError,
             "save_safetensors: name '{}' is reserved or used twice", name);
    Tensor c = contiguous(t.detach().cpu());
    const uint64_t bytes = static_cast<uint64_t>(c.numel()) * c.element_size();
    header[name] = {{"dtype", st_dtype(c.dtype())}, {"shape", c.sizes()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    host.push_back(c);
  }
  std::string json = header.dump();
  // The format recommends padding the header with spaces to a multiple of 8 so the data are aligned.
  json.append((8 - json.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  FG_CHECK(f.good(), IOError, "save_safetensors: cannot open '{}' for writing", path);
  const uint64_t n = json.size();
  f.write(reinterpret_cast<const char*>(&n), 8);
  f.write(json.data(), static_cast<std::streamsize>(json.size()));
  for (const auto& c : host) {
    f.write(static_cast<const char*>(c.data_ptr()), static_cast<std::streamsize>(c.numel() * c.element_size()));
  }
  FG_CHECK(f.good(), IOError, "save_safetensors: writing '{}' failed", path);
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FG_CHECK(f.good(), IOError, "load_safetensors: cannot open '{}'", path);
  f.seekg(0, std::ios::end);
  const uint64_t file_size = static_cast<uint64_t>(f.tellg());
  f.seekg(0);
  FG_CHECK(file_size >= 8, IOError, "load_safetensors: '{}' is {} bytes, too short for the 8-byte header length", path,
           file_size);
  uint64_t n = 0;
  f.read(reinterpret_cast<char*>(&n), 8);
  FG_CHECK(n <= file_size - 8 && n <= (100u << 20), IOError,
           "load_safetensors: '{}' declares a {}-byte header but the file has {} bytes", path, n, file_size);
  std::string json(n, '\0');
  f.read(json.data(), static_cast<std::streamsize>(n));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(json);
  } catch (const std::exception& e) {
    FG_FAIL(IOError, "load_safetensors: '{}' has a malformed JSON header: {}", path, e.what());
  }
  FG_CHECK(header.is_object(), IOError, "load_safetensors: '{}': the header is not a JSON object", path);
  const uint64_t data_size = file_size - 8 - n;
  SafetensorsFile out;
  struct Entry { std::string name; DType dtype; Shape shape; uint64_t begin, end; };
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      FG_CHECK(it->is_object(), IOError, "load_safetensors: '{}': __metadata__ is not an object", path);
      for (auto m = it->begin(); m != it->end(); ++m) {
        FG_CHECK(m->is_string(), IOError, "load_safetensors: '{}': metadata '{}' is not a string", path, m.key());
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const auto& v = *it;
    try {
      Entry e{it.key(), kFloat32, {}, 0, 0};
      FG_CHECK(v.at("shape").is_array() && v.at("data_offsets").is_array(), IOError,
               "load_safetensors: '{}': tensor '{}' has a shape or data_offsets that is not a list", path, e.name);
      for (const auto& s : v.at("shape"))
        e.shape.push_back(static_cast<int64_t>(
            json_uint(s, static_cast<uint64_t>(std::numeric_limits<int64_t>::max()), path, e.name, "a shape")));
      const std::string dt = v.at("dtype").get<std::string>();
      FG_CHECK(parse_dtype(dt, e.dtype), IOError, "load_safetensors: '{}': tensor '{}' has unsupported dtype {}", path,
               e.name, dt);
      std::vector<uint64_t> off;
      for (const auto& o : v.at("data_offsets"))
        off.push_back(json_uint(o, std::numeric_limits<uint64_t>::max(), path, e.name, "a data_offsets"));
      FG_CHECK(off.size() == 2 && off[0] <= off[1] && off[1] <= data_size, IOError,
               "load_safetensors: '{}': tensor '{}' has data_offsets {} outside the {} data bytes", path, e.name,
               fmt::join(off, ","), data_size);
      e.begin = off[0];
      e.end = off[1];
      // Untrusted sizes: count the bytes without wrapping (a shape of 2^62 elements must not look like 0 bytes).
      uint64_t want = 0;
      try {
        want = static_cast<uint64_t>(checked_nbytes(shape_numel(e.shape), element_size(e.dtype), "load_safetensors"));
      } catch (const ShapeError& err) {
        FG_FAIL(IOError, "load_safetensors: '{}': tensor '{}' has shape {} that cannot be held in memory ({})", path,
                e.name, shape_str(e.shape), err.what());
      }
      FG_CHECK(want == e.end - e.begin, IOError,
               "load_safetensors: '{}': tensor '{}' is {} {} ({} bytes) but its offsets span {} bytes", path, e.name,
               dt, shape_str(e.shape), want, e.end - e.begin);
      entries.push_back(e);
    } catch (const nlohmann::json::exception& ex) {
      FG_FAIL(IOError, "load_safetensors: '{}': entry '{}' is malformed: {}", path, it.key(), ex.what());
    }
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries.size(); ++i) {
    FG_CHECK(entries[i].begin >= entries[i - 1].end, IOError, "load_safetensors: '{}': tensors '{}' and '{}' overlap",
             path, entries[i - 1].name, entries[i].name);
  }
  for (const auto& e : entries) {
    Tensor t = empty(e.shape, e.dtype);
    f.seekg(static_cast<std::streamoff>(8 + n + e.begin));
    f.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(e.end - e.begin));
    FG_CHECK(f.good(), IOError, "load_safetensors: '{}': reading tensor '{}' failed", path, e.name);
    if (e.dtype == kBool) {  // a byte other than 0 / 1 is not a bool: reading it as one is undefined behaviour
      const auto* bytes = static_cast<const unsigned char*>(t.data_ptr());
      for (uint64_t i = 0; i < e.end - e.begin; ++i)
        FG_CHECK(bytes[i] <= 1, IOError, "load_safetensors: '{}': BOOL tensor '{}' element {} has byte value {}", path,
                 e.name, i, static_cast<int>(bytes[i]));
    }
    out.tensors.emplace_back(e.name, t);
  }
  return out;
}

void save_module(const Module& module, const std::string& path, const std::map<std::string, std::string>& metadata) {
  save_safetensors(path, module.state_dict(), metadata);
}

void load_module(Module& module, const std::string& path, bool strict) {
  module.load_state_dict(load_safetensors(path).tensors, strict);
}

}  // namespace fg::nn
