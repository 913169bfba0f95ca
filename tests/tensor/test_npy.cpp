// .npy reading and writing, including hand-written files for the layouts flexgrad never writes itself.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "flexgrad/tensor/npy.h"
#include "flexgrad/tensor/random.h"

namespace fg {
namespace {

using testing::scratch_path;

namespace fs = std::filesystem;

// Writes a .npy file by hand: version major.0, the given dict (padded to 64-byte alignment), raw bytes.
void write_npy(const std::string& path, const std::string& dict, const std::string& data, int major = 1) {
  size_t len_size = major == 1 ? 2 : 4;
  std::string header = dict;
  size_t total = 8 + len_size + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY", 6);
  f.put(static_cast<char>(major));
  f.put(0);
  for (size_t i = 0; i < len_size; ++i) f.put(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  f << header << data;
}

template <class T> std::string bytes_of(const std::vector<T>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
}

using ::fg::testing::expect_error;

TEST(Npy, RoundTripEveryDType) {
  const DType all[] = {kBool, kInt32, kInt64, kFloat16, kFloat32, kFloat64};
  Generator gen(7);
  for (DType dt : all) {
    Tensor t = dt == kBool ? bernoulli({3, 4}, 0.5, kBool, &gen)
               : is_floating(dt) ? randn({3, 4}, dt, &gen)
                                 : randint(-1000, 1000, {3, 4}, dt, &gen);
    std::string p = scratch_path(fmt::format("rt_{}.npy", dt));
    save_npy(p, t);
    Tensor back = load_npy(p);
    EXPECT_EQ(back.dtype(), dt);
    EXPECT_EQ(back.sizes(), (Shape{3, 4}));
    EXPECT_TRUE(back.is_contiguous());
    EXPECT_EQ(back.to_vector(), t.to_vector()) << dtype_name(dt);
  }
}

TEST(Npy, HeaderIsNumpyCompatible) {
  std::string p = scratch_path("hdr.npy");
  save_npy(p, zeros({2, 3}, kInt32));
  std::ifstream f(p, std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(f)), {});
  ASSERT_EQ(all.size(), 128u + 24u);  // header padded to 128 bytes, then 6 int32
  EXPECT_EQ(all.substr(0, 8), std::string("\x93NUMPY\x01\x00", 8));
  const std::string dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }";
  EXPECT_EQ(all.substr(10, dict.size()), dict);
  EXPECT_EQ(all.substr(10 + dict.size(), 117 - dict.size()), std::string(117 - dict.size(), ' '));
  EXPECT_EQ(all[127], '\n');
}

TEST(Npy, ZeroDimAndOneDim) {
  std::string p = scratch_path("scalar.npy");
  save_npy(p, full({}, 2.5, kFloat64));
  Tensor s = load_npy(p);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.item<double>(), 2.5);
  save_npy(p, arange(5.0));
  Tensor v = load_npy(p);
  EXPECT_EQ(v.sizes(), Shape{5});
  EXPECT_EQ(v.to_vector(), (std::vector<double>{0, 1, 2, 3, 4}));
  save_npy(p, zeros({0, 2}));
  EXPECT_EQ(load_npy(p).sizes(), (Shape{0, 2}));
}

TEST(Npy, SavesNonContiguousInLogicalOrder) {
  Tensor base = arange(12.0, kFloat32);
  Tensor tr = base.alias_with_layout({4, 3}, {1, 4}, 0);     // transpose of a [3, 4] matrix
  Tensor strided = base.alias_with_layout({3}, {4}, 1);       // a column, offset 1
  std::string p = scratch_path("nc.npy");
  save_npy(p, tr);
  EXPECT_EQ(load_npy(p).to_vector(), tr.to_vector());
  save_npy(p, strided);
  EXPECT_EQ(load_npy(p).to_vector(), (std::vector<double>{1, 5, 9}));
  Tensor bcast = base.alias_with_layout({2, 3}, {0, 1}, 2);  // a broadcast (stride 0) view
  save_npy(p, bcast);
  EXPECT_EQ(load_npy(p).to_vector(), (std::vector<double>{2, 3, 4, 2, 3, 4}));
}

TEST(Npy, FortranOrderLoadsWithTransposedStrides) {
  // NumPy's np.asfortranarray([[1, 2, 3], [4, 5, 6]]) stores columns: 1 4 2 5 3 6.
  std::string p = scratch_path("fortran.npy");
  write_npy(p, "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3), }", bytes_of<double>({1, 4, 2, 5, 3, 6}));
  Tensor t = load_npy(p);
  EXPECT_EQ(t.sizes(), (Shape{2, 3}));
  EXPECT_EQ(t.strides(), (Shape{1, 2}));
  EXPECT_EQ(t.to_vector(), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  // Saved again, it is written in C order.
  std::string q = scratch_path("fortran_resaved.npy");
  save_npy(q, t);
  Tensor c = load_npy(q);
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.to_vector(), t.to_vector());
}

TEST(Npy, BigEndianIsSwapped) {
  std::string p = scratch_path("be.npy");
  // int32 1, 256, -2 and float32 1.5 in big-endian byte order.
  std::string ints("\x00\x00\x00\x01\x00\x00\x01\x00\xff\xff\xff\xfe", 12);
  write_npy(p, "{'descr': '>i4', 'fortran_order': False, 'shape': (3,), }", ints);
  EXPECT_EQ(load_npy(p).to_vector(), (std::vector<double>{1, 256, -2}));
  write_npy(p, "{'descr': '>f4', 'fortran_order': False, 'shape': (1,), }", std::string("\x3f\xc0\x00\x00", 4));
  EXPECT_EQ(load_npy(p).to_vector(), (std::vector<double>{1.5}));
  write_npy(p, "{'descr': '>f2', 'fortran_order': False, 'shape': (), }", std::string("\xc1\x00", 2));
  EXPECT_EQ(load_npy(p).item<double>(), -2.5);
}

TEST(Npy, Version2And3Headers) {
  std::string p = scratch_path("v2.npy");
  write_npy(p, "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", bytes_of<int64_t>({-5, 1LL << 40}), 2);
  Tensor t = load_npy(p);
  EXPECT_EQ(t.dtype(), kInt64);
  EXPECT_EQ(t.at({1}), static_cast<double>(1LL << 40));
  write_npy(p, "{\"descr\": \"|b1\", \"fortran_order\": False, \"shape\": (3,)}", std::string("\x01\x00\x01", 3), 3);
  EXPECT_EQ(load_npy(p).to_vector(), (std::vector<double>{1, 0, 1}));
}

TEST(Npy, Errors) {
  expect_error<IOError>([] { load_npy("/nonexistent/dir/x.npy"); }, "cannot open '/nonexistent/dir/x.npy'");
  std::string p = scratch_path("bad.npy");
  {
    std::ofstream f(p, std::ios::binary);
    f << "PK\x03\x04 this is a zip, not an npy file";
  }
  expect_error<IOError>([&] { load_npy(p); }, "is not a .npy file (bad magic");
  write_npy(p, "{'descr': '<c8', 'fortran_order': False, 'shape': (1,), }", std::string(8, '\0'));
  expect_error<IOError>([&] { load_npy(p); }, "unsupported dtype '<c8'");
  write_npy(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }", std::string(8, '\0'));
  expect_error<IOError>([&] { load_npy(p); }, "truncated data (expected 16 bytes for shape [4] float32, got 8)");
  write_npy(p, "{'descr': '<f4', 'shape': (4,), }", std::string(16, '\0'));
  expect_error<IOError>([&] { load_npy(p); }, "header lacks 'fortran_order'");
  try {
    load_npy(p);
  } catch (const IOError& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos);  // every error names the file
  }
  expect_error<IOError>([&] { save_npy(scratch_path("bf16.npy"), zeros({2}, kBFloat16)); },
                        "dtype bfloat16 has no NumPy equivalent");
  expect_error<IOError>([] { save_npy("/nonexistent/dir/y.npy", zeros({1})); }, "cannot open '/nonexistent/dir/y.npy'");
}

// A 144-byte file whose shape claims 2^62 elements used to load over 0 bytes and crash on read; one of
// 2^32 x 2^32 elements loaded as numel 0. Both are rejected before anything is allocated.
TEST(Npy, ShapesTheFileCannotHoldAreRejected) {
  const std::string p = scratch_path("huge.npy");
  write_npy(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", "");
  EXPECT_THROW_MSG(load_npy(p), IOError, "huge.npy", "shape [4611686018427387904] of float32 cannot be held");
  write_npy(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", "");
  EXPECT_THROW_MSG(load_npy(p), IOError, "huge.npy", "[4294967296, 4294967296]");
  write_npy(p, "{'descr': '<f8', 'fortran_order': False, 'shape': (1000, 1000), }", std::string(64, '\0'));
  EXPECT_THROW_MSG(load_npy(p), IOError, "huge.npy", "truncated data (expected 8000000 bytes for shape [1000, 1000] float64, got 64)");
  write_npy(p, "{'descr': '<f4', 'fortran_order': True, 'shape': (0, 4611686018427387904, 4611686018427387904), }", "");
  EXPECT_THROW_MSG(load_npy(p), IOError, "huge.npy");
}

TEST(Npy, ConformanceFiles) {
  // The environment may point elsewhere (a git worktree has no ../shared next to it).
  const char* env = std::getenv("FLEXGRAD_CONFORMANCE_DIR");
  std::string dir = env ? env : FLEXGRAD_CONFORMANCE_DIR;
  if (!fs::exists(dir + "/alibi_causal.q.npy")) GTEST_SKIP() << "conformance data not present at " << dir;
  Tensor q = load_npy(dir + "/alibi_causal.q.npy");
  EXPECT_EQ(q.dtype(), kFloat32);
  EXPECT_EQ(q.sizes(), (Shape{1, 4, 256, 64}));
  for (double v : q.alias_with_layout({64}, {1}, 0).to_vector()) EXPECT_TRUE(std::isfinite(v));
  Tensor num = load_npy(dir + "/alibi_causal.block_kv_num.npy");
  EXPECT_EQ(num.dtype(), kInt32);
  EXPECT_EQ(num.sizes(), (Shape{1, 1, 2}));  // [B, H (broadcast), S / 128] for S = 256
  // Causal with 128-aligned blocks: each query block has exactly one partial KV block, the diagonal.
  EXPECT_EQ(num.to_vector(), (std::vector<double>{1, 1}));
}

}  // namespace
}  // namespace fg
