// NumPy .npy reader/writer. Format: magic "\x93NUMPY", major, minor, header length (2 bytes in 1.0, 4
// bytes in 2.0/3.0, little-endian), an ASCII (3.0: UTF-8) Python dict literal
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } padded with spaces and a '\n' so that the
// data starts 64-byte aligned, then the raw elements.
#include "flexgrad/tensor/npy.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cctype>
#include <cstring>
#include <fstream>
#include <optional>
#include <vector>

namespace fg {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

bool host_is_little_endian() { return std::endian::native == std::endian::little; }

// ---- header dict parsing: a tiny reader for the Python literal NumPy writes ----
struct HeaderParser {
  const std::string& s;
  const std::string& path;
  size_t pos = 0;

  [[noreturn]] void fail(const std::string& what) const {
    FG_FAIL(IOError, "load_npy: '{}': malformed header ({} at offset {} of header \"{}\")", path, what, pos, s);
  }
  void skip_ws() { while (pos < s.size() && std::isspace(static_cast<unsigned char>(s[pos]))) ++pos; }
  bool eat(char c) {
    skip_ws();
    if (pos < s.size() && s[pos] == c) { ++pos; return true; }
    return false;
  }
  void expect(char c) { if (!eat(c)) fail(fmt::format("expected '{}'", c)); }
  std::string string_lit() {
    skip_ws();
    if (pos >= s.size() || (s[pos] != '\'' && s[pos] != '"')) fail("expected a string");
    char q = s[pos++];
    size_t end = s.find(q, pos);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s.substr(pos, end - pos);
    pos = end + 1;
    return out;
  }
  bool bool_lit() {
    skip_ws();
    if (s.compare(pos, 4, "True") == 0) { pos += 4; return true; }
    if (s.compare(pos, 5, "False") == 0) { pos += 5; return false; }
    fail("expected True or False");
  }
  Shape tuple_lit() {
    expect('(');
    Shape out;
    while (!eat(')')) {
      skip_ws();
      size_t start = pos;
      while (pos < s.size() && std::isdigit(static_cast<unsigned char>(s[pos]))) ++pos;
      if (pos == start) fail("expected a non-negative integer in shape");
      // Untrusted digits: a size past the int64 range is malformed (std::stoll would throw std::out_of_range).
      int64_t size = 0;
      for (size_t i = start; i < pos; ++i) {
        if (__builtin_mul_overflow(size, int64_t{10}, &size) || __builtin_add_overflow(size, s[i] - '0', &size))
          fail(fmt::format("shape entry {} is past the int64 range", s.substr(start, pos - start)));
      }
      out.push_back(size);
      eat('L');  // Python 2 long suffix in old files
      if (!eat(',')) { expect(')'); break; }
    }
    return out;
  }
};

struct Header {
  std::string descr;
  bool fortran_order = false;
  Shape shape;
};

Header parse_header(const std::string& text, const std::string& path) {
  HeaderParser p{text, path};
  Header h;
  bool has_descr = false, has_order = false, has_shape = false;
  p.expect('{');
  while (!p.eat('}')) {
    std::string key = p.string_lit();
    p.expect(':');
    if (key == "descr") { h.descr = p.string_lit(); has_descr = true; }
    else if (key == "fortran_order") { h.fortran_order = p.bool_lit(); has_order = true; }
    else if (key == "shape") { h.shape = p.tuple_lit(); has_shape = true; }
    else p.fail(fmt::format("unexpected key '{}'", key));
    if (!p.eat(',')) { p.expect('}'); break; }
  }
  FG_CHECK(has_descr && has_order && has_shape, IOError,
           "load_npy: '{}': header lacks {} (header \"{}\")", path,
           !has_descr ? "'descr'" : !has_order ? "'fortran_order'" : "'shape'", text);
  return h;
}

// descr -> dtype and whether the data must be byte-swapped. '|' (not applicable) is only for 1-byte types.
std::pair<DType, bool> parse_descr(const std::string& descr, const std::string& path) {
  auto unsupported = [&] {
    FG_FAIL(IOError,
            "load_npy: '{}': unsupported dtype '{}' (supported: |b1 bool, i4 int32, i8 int64, f2 float16, f4 "
            "float32, f8 float64, with '<', '>' or '=' byte order)",
            path, descr);
  };
  if (descr.size() != 3) unsupported();
  char order = descr[0];
  std::string code = descr.substr(1);
  DType t;
  if (code == "b1") t = kBool;
  else if (code == "i4") t = kInt32;
  else if (code == "i8") t = kInt64;
  else if (code == "f2") t = kFloat16;
  else if (code == "f4") t = kFloat32;
  else if (code == "f8") t = kFloat64;
  else unsupported();
  bool little;
  if (order == '<') little = true;
  else if (order == '>') little = false;
  else if (order == '=' || order == '|') little = host_is_little_endian();
  else unsupported();
  if (order == '|' && t != kBool) unsupported();
  return {t, little != host_is_little_endian()};
}

std::string descr_of(DType t, const std::string& path) {
  const char order = host_is_little_endian() ? '<' : '>';
  switch (t) {
    case DType::Bool: return "|b1";
    case DType::Int32: return fmt::format("{}i4", order);
    case DType::Int64: return fmt::format("{}i8", order);
    case DType::Float16: return fmt::format("{}f2", order);
    case DType::Float32: return fmt::format("{}f4", order);
    case DType::Float64: return fmt::format("{}f8", order);
    case DType::BFloat16: break;
  }
  FG_FAIL(IOError, "save_npy: '{}': dtype {} has no NumPy equivalent; convert to float32 first", path, t);
}

void byte_swap(char* data, size_t count, size_t width) {
  for (size_t i = 0; i < count; ++i) std::reverse(data + i * width, data + (i + 1) * width);
}

// Copies the elements of any tensor, in row-major order, into a contiguous host buffer. Only the byte span
// the view touches is brought to the host (one device copy), then strides are walked on the CPU.
std::vector<char> contiguous_host_bytes(const Tensor& t) {
  size_t es = t.element_size();
  std::vector<char> out(static_cast<size_t>(t.numel()) * es);
  if (t.numel() == 0) return out;
  int64_t lo = t.storage_offset(), hi = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    int64_t reach = (t.sizes()[d] - 1) * t.strides()[d];
    (reach < 0 ? lo : hi) += reach;
  }
  std::vector<char> span(static_cast<size_t>(hi - lo + 1) * es);
  const char* base = static_cast<const char*>(t.storage()->data()) + lo * static_cast<int64_t>(es);
  device_backend(t.device()).copy_bytes(span.data(), kCPU, base, t.device(), span.size());
  Shape idx(t.dim(), 0);
  int64_t off = t.storage_offset() - lo;
  for (int64_t n = 0; n < t.numel(); ++n) {
    std::memcpy(out.data() + n * es, span.data() + off * static_cast<int64_t>(es), es);
    for (int64_t d = t.dim() - 1; d >= 0; --d) {  // odometer increment, keeping `off` in step
      off += t.strides()[d];
      if (++idx[d] < t.sizes()[d]) break;
      off -= idx[d] * t.strides()[d];
      idx[d] = 0;
    }
  }
  return out;
}

}  // namespace

Tensor load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FG_CHECK(f.good(), IOError, "load_npy: cannot open '{}': {}", path, std::strerror(errno));
  char prefix[kMagicLen + 2];
  f.read(prefix, sizeof(prefix));
  FG_CHECK(f.gcount() == static_cast<std::streamsize>(sizeof(prefix)) && std::memcmp(prefix, kMagic, kMagicLen) == 0,
           IOError, "load_npy: '{}' is not a .npy file (bad magic: expected \\x93NUMPY)", path);
  int major = static_cast<unsigned char>(prefix[6]), minor = static_cast<unsigned char>(prefix[7]);
  FG_CHECK(major >= 1 && major <= 3, IOError, "load_npy: '{}': unsupported .npy format version {}.{}", path, major,
           minor);
  unsigned char len_bytes[4] = {0, 0, 0, 0};
  size_t len_size = major == 1 ? 2 : 4;
  f.read(reinterpret_cast<char*>(len_bytes), static_cast<std::streamsize>(len_size));
  FG_CHECK(f.gcount() == static_cast<std::streamsize>(len_size), IOError,
           "load_npy: '{}': truncated header length", path);
  size_t header_len = 0;
  for (size_t i = len_size; i-- > 0;) header_len = header_len << 8 | len_bytes[i];
  {  // checked before allocating: a damaged length field must not ask for up to 4 GiB
    const std::streampos here = f.tellg();
    f.seekg(0, std::ios::end);
    const auto remaining = static_cast<size_t>(f.tellg() - here);
    f.seekg(here);
    FG_CHECK(header_len <= remaining, IOError,
             "load_npy: '{}': truncated header (the header length field says {} bytes, the file has {} left)", path,
             header_len, remaining);
  }
  std::string header(header_len, '\0');
  f.read(header.data(), static_cast<std::streamsize>(header_len));
  FG_CHECK(f.gcount() == static_cast<std::streamsize>(header_len), IOError,
           "load_npy: '{}': truncated header (expected {} bytes)", path, header_len);

  Header h = parse_header(header, path);
  auto [dtype, swap] = parse_descr(h.descr, path);
  // The shape is untrusted: its byte size must be countable and the file must hold that many bytes, both
  // checked before anything is allocated.
  int64_t nbytes_needed = 0;
  try {
    nbytes_needed = checked_nbytes(shape_numel(h.shape), element_size(dtype), "load_npy");
  } catch (const ShapeError& e) {
    FG_FAIL(IOError, "load_npy: '{}': shape {} of {} cannot be held in memory ({})", path, shape_str(h.shape), dtype,
            e.what());
  }
  {
    const std::streampos here = f.tellg();
    f.seekg(0, std::ios::end);
    const int64_t remaining = static_cast<int64_t>(f.tellg() - here);
    f.seekg(here);
    FG_CHECK(remaining >= nbytes_needed, IOError,
             "load_npy: '{}': truncated data (expected {} bytes for shape {} {}, got {})", path, nbytes_needed,
             shape_str(h.shape), dtype, remaining);
  }
  // Fortran order stores the transposed layout: the first dim varies fastest.
  Shape strides(h.shape.size());
  if (h.fortran_order) {
    int64_t s = 1;
    for (size_t d = 0; d < h.shape.size(); ++d) {
      strides[d] = s;
      FG_CHECK(!__builtin_mul_overflow(s, std::max<int64_t>(h.shape[d], 1), &s), IOError,
               "load_npy: '{}': shape {} has strides past the int64 range", path, shape_str(h.shape));
    }
  } else {
    strides = contiguous_strides(h.shape);
  }
  Tensor t = empty_strided(h.shape, strides, TensorOptions().dtype(dtype));
  size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (nbytes > 0) {
    char* data = static_cast<char*>(t.storage()->data());
    f.read(data, static_cast<std::streamsize>(nbytes));
    FG_CHECK(static_cast<size_t>(f.gcount()) == nbytes, IOError,
             "load_npy: '{}': truncated data (expected {} bytes for shape {} {}, got {})", path, nbytes,
             shape_str(h.shape), dtype, f.gcount());
    if (swap) byte_swap(data, static_cast<size_t>(t.numel()), t.element_size());
    if (dtype == kBool) {
      for (size_t i = 0; i < nbytes; ++i) {
        FG_CHECK(data[i] == 0 || data[i] == 1, IOError, "load_npy: '{}': bool element {} has byte value {}", path, i,
                 static_cast<int>(static_cast<unsigned char>(data[i])));
      }
    }
  }
  return t;
}

void save_npy(const std::string& path, const Tensor& t) {
  FG_CHECK(t.defined(), ValueError, "save_npy: '{}': the tensor is undefined", path);
  std::string descr = descr_of(t.dtype(), path);
  std::string shape;
  for (int64_t s : t.sizes()) shape += fmt::format("{}, ", s);
  if (t.dim() > 1) shape.resize(shape.size() - 2);  // (3,) keeps its comma; (2, 3) does not
  if (t.dim() == 1) shape.resize(shape.size() - 1);
  std::string dict = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}", descr, shape);
  // Pad with spaces so that magic + version + length + dict + '\n' is a multiple of 64 bytes.
  size_t len_size = 2;
  int major = 1;
  size_t total = kMagicLen + 2 + len_size + dict.size() + 1;
  if ((total + 63) / 64 * 64 - kMagicLen - 2 - len_size > 0xffff) { len_size = 4; major = 2; }
  total = kMagicLen + 2 + len_size + dict.size() + 1;
  dict.append((64 - total % 64) % 64, ' ');
  dict.push_back('\n');

  std::vector<char> data = contiguous_host_bytes(t);
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  FG_CHECK(f.good(), IOError, "save_npy: cannot open '{}' for writing: {}", path, std::strerror(errno));
  f.write(kMagic, kMagicLen);
  char version[2] = {static_cast<char>(major), 0};
  f.write(version, 2);
  size_t hlen = dict.size();
  for (size_t i = 0; i < len_size; ++i) f.put(static_cast<char>((hlen >> (8 * i)) & 0xff));
  f.write(dict.data(), static_cast<std::streamsize>(dict.size()));
  f.write(data.data(), static_cast<std::streamsize>(data.size()));
  f.close();
  FG_CHECK(!f.fail(), IOError, "save_npy: writing '{}' failed: {}", path, std::strerror(errno));
}

}  // namespace fg
