// Minimal .npy reader for the attention tests (little-endian int32/int64/float32/float64/bool, C order,
// format 1.0-3.0). TEMPORARY: fg::load_npy (tensor/npy.h) is being written on another branch; replace
// uses of read_npy_for_tests with fg::load_npy after the merge and delete this file.
#pragma once
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace fg::testing {

inline Tensor read_npy_for_tests(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  FG_CHECK(f.good(), IOError, "read_npy_for_tests: cannot open {}", path);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  FG_CHECK(bytes.size() > 10 && bytes.compare(0, 6, "\x93NUMPY") == 0, IOError, "{}: not a .npy file", path);
  const int major = static_cast<unsigned char>(bytes[6]);
  size_t header_len, off;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
    off = 10;
  } else {
    uint32_t hl;
    std::memcpy(&hl, bytes.data() + 8, 4);
    header_len = hl;
    off = 12;
  }
  const std::string header = bytes.substr(off, header_len);
  auto field = [&](const std::string& key) {
    size_t p = header.find("'" + key + "'");
    FG_CHECK(p != std::string::npos, IOError, "{}: header lacks {}", path, key);
    return header.substr(header.find(':', p) + 1);
  };
  const std::string descr = field("descr");
  FG_CHECK(field("fortran_order").find("False") < 3, IOError, "{}: Fortran order not supported here", path);
  const std::string shp = field("shape");
  Shape shape;
  const std::string inner = shp.substr(shp.find('(') + 1, shp.find(')') - shp.find('(') - 1);
  size_t i = 0;
  while (i < inner.size()) {
    while (i < inner.size() && (inner[i] == ' ' || inner[i] == ',')) ++i;
    if (i >= inner.size()) break;
    size_t j = i;
    while (j < inner.size() && isdigit(static_cast<unsigned char>(inner[j]))) ++j;
    shape.push_back(std::stoll(inner.substr(i, j - i)));
    i = j;
  }
  DType dt;
  if (descr.find("<i4") != std::string::npos) dt = kInt32;
  else if (descr.find("<i8") != std::string::npos) dt = kInt64;
  else if (descr.find("<f4") != std::string::npos) dt = kFloat32;
  else if (descr.find("<f8") != std::string::npos) dt = kFloat64;
  else if (descr.find("|b1") != std::string::npos) dt = kBool;
  else FG_FAIL(IOError, "{}: unsupported descr {}", path, descr);
  Tensor t = empty(shape, dt);
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  FG_CHECK(bytes.size() >= off + header_len + nbytes, IOError, "{}: truncated data", path);
  std::memcpy(t.data_ptr(), bytes.data() + off + header_len, nbytes);
  return t;
}

}  // namespace fg::testing
