// cuDNN's fused SDPA through the graph API's C backend (cudnn_graph.h: cudnnBackendCreateDescriptor ...
// cudnnBackendExecute), for the calls lower_to_cudnn accepted (FlexBackend::Cudnn).
//
// The graphs are the operation sequence cuDNN's engines recognise as flash attention (the one cudnn-frontend's
// SDPA node emits; read, not copied): forward  S = Q K^T (float), * scale, [+ bias], [+ slope[h] (col - row)],
// [band: select(row + r >= col, S, -inf), select(col + l > row, S, -inf)], softmax as max / sub / exp / sum /
// div with stats = max + log(sum), O = P V. Backward: the dO.O row sums (softmax_sum, workspace), S again,
// - stats, exp, dV = P^T dO, dP = dO V^T, dS = (dP - softmax_sum) P [dBias = sum dS], * scale, dK = dS^T Q,
// dQ = dS K through a float accumulator (workspace). GQA: the Hq-head dK/dV reduced to Hkv heads in the graph.
//
// libcudnn.so.9 is opened with dlopen at first use (FLEXGRAD_CUDNN_LIBRARY names another file): the build needs
// only cudnn_graph.h, a machine without cuDNN still loads libflexgrad, and the wheel's copy on the H200
// (site-packages/nvidia/cudnn/lib) works through LD_LIBRARY_PATH. Plans are cached per (direction, spec,
// shapes, dtype, strides, device); workspaces come from flexgrad's caching allocator.
#include "flexgrad/attention/cudnn_backend.h"

#if FLEXGRAD_WITH_CUDNN
#include <cudnn_graph.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/tensor/cuda/cuda_check.h"
#include "flexgrad/tensor/cuda/shared_library.h"

namespace fg {
namespace {

// ---------------------------------------------------------------- the library, opened once
struct CudnnApi {
  decltype(&cudnnGetVersion) get_version = nullptr;
  decltype(&cudnnGetErrorString) error_string = nullptr;
  decltype(&cudnnGetLastErrorString) last_error = nullptr;
  decltype(&cudnnCreate) create = nullptr;
  decltype(&cudnnSetStream) set_stream = nullptr;
  decltype(&cudnnBackendCreateDescriptor) create_desc = nullptr;
  decltype(&cudnnBackendDestroyDescriptor) destroy_desc = nullptr;
  decltype(&cudnnBackendSetAttribute) set_attr = nullptr;
  decltype(&cudnnBackendGetAttribute) get_attr = nullptr;
  decltype(&cudnnBackendFinalize) finalize = nullptr;
  decltype(&cudnnBackendExecute) execute = nullptr;
  std::string unavailable;  // why it cannot be used (empty when it can)
  size_t version = 0;
};

const CudnnApi& api() {
  static const CudnnApi a = [] {
    CudnnApi r;
    const char* env = std::getenv("FLEXGRAD_CUDNN_LIBRARY");
    const std::string name = env && *env ? env : "libcudnn.so.9";
    const cuda::SharedLibrary so({name});
    if (!so.is_open()) {
      r.unavailable = fmt::format("cannot load {} ({}); put cuDNN 9's library directory on LD_LIBRARY_PATH or set "
                                  "FLEXGRAD_CUDNN_LIBRARY", name, so.why());
      return r;
    }
    bool ok = true;
    auto sym = [&](auto& fn, const char* s) {
      if (!so.find(fn, s) && ok) {  // the first one missing
        ok = false;
        r.unavailable = fmt::format("{} has no symbol {}", name, s);
      }
    };
    sym(r.get_version, "cudnnGetVersion");
    sym(r.error_string, "cudnnGetErrorString");
    sym(r.last_error, "cudnnGetLastErrorString");
    sym(r.create, "cudnnCreate");
    sym(r.set_stream, "cudnnSetStream");
    sym(r.create_desc, "cudnnBackendCreateDescriptor");
    sym(r.destroy_desc, "cudnnBackendDestroyDescriptor");
    sym(r.set_attr, "cudnnBackendSetAttribute");
    sym(r.get_attr, "cudnnBackendGetAttribute");
    sym(r.finalize, "cudnnBackendFinalize");
    sym(r.execute, "cudnnBackendExecute");
    if (!ok) return r;
    r.version = r.get_version();
    // 9.6: dQ's float accumulator needs no memset; 9.10.2: -inf masks, bounds with a bias.
    if (r.version < 91002) {
      r.unavailable = fmt::format("{} is cuDNN {}; the cuDNN backend needs 9.10.2 or newer", name, r.version);
    }
    return r;
  }();
  return a;
}

[[noreturn]] void throw_cudnn(cudnnStatus_t s, const char* what) {
  char msg[1024] = {0};
  api().last_error(msg, sizeof msg);
  FG_FAIL(CudaError, "cuDNN: {} failed: {} ({})", what, api().error_string(s), msg[0] ? msg : "no further message");
}
#define FG_CUDNN(call, what)                                 \
  do {                                                      \
    cudnnStatus_t s_ = (call);                              \
    if (s_ != CUDNN_STATUS_SUCCESS) throw_cudnn(s_, what);  \
  } while (0)

// A backend descriptor, destroyed with its last owner.
using Desc = std::shared_ptr<std::remove_pointer_t<cudnnBackendDescriptor_t>>;

Desc make(cudnnBackendDescriptorType_t type, const char* what) {
  cudnnBackendDescriptor_t d = nullptr;
  FG_CUDNN(api().create_desc(type, &d), what);
  return Desc(d, [](cudnnBackendDescriptor_t p) { api().destroy_desc(p); });
}
template <class T>
void set(const Desc& d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const T& value,
         const char* what) {
  FG_CUDNN(api().set_attr(d.get(), name, type, 1, &value), what);
}
template <class T>
void set_n(const Desc& d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, const std::vector<T>& v,
           const char* what) {
  FG_CUDNN(api().set_attr(d.get(), name, type, static_cast<int64_t>(v.size()), v.data()), what);
}
void set_desc(const Desc& d, cudnnBackendAttributeName_t name, const Desc& value, const char* what) {
  cudnnBackendDescriptor_t raw = value.get();
  FG_CUDNN(api().set_attr(d.get(), name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &raw), what);
}
void finalize(const Desc& d, const char* what) { FG_CUDNN(api().finalize(d.get()), what); }

// ---------------------------------------------------------------- graph building
struct TensorDesc {
  Desc d;
  int64_t uid = 0;
};

class GraphBuilder {
 public:
  // A tensor of the graph; by_value scalars are [1, 1, 1, 1] and their host value travels in the variant pack.
  TensorDesc tensor(cudnnDataType_t dt, std::vector<int64_t> dims, std::vector<int64_t> strides, bool is_virtual,
                    int64_t uid = 0, bool by_value = false) {
    TensorDesc t;
    t.uid = uid ? uid : next_virtual_++;
    t.d = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR, "create tensor descriptor");
    set(t.d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, dt, "tensor data type");
    set_n(t.d, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, dims, "tensor dimensions");
    set_n(t.d, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, strides, "tensor strides");
    set(t.d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, t.uid, "tensor unique id");
    set(t.d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, int64_t{16}, "tensor alignment");
    set(t.d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, is_virtual, "tensor is_virtual");
    if (by_value) set(t.d, CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, true, "tensor is_by_value");
    finalize(t.d, "finalize tensor descriptor");
    return t;
  }
  // One descriptor per uid (the graph's tensors are told apart by uid): a second request returns the first.
  TensorDesc scalar(cudnnDataType_t dt, int64_t uid) {
    auto it = scalars_.find(uid);
    if (it == scalars_.end()) it = scalars_.emplace(uid, tensor(dt, {1, 1, 1, 1}, {1, 1, 1, 1}, false, uid, true)).first;
    return it->second;
  }
  TensorDesc virt(cudnnDataType_t dt, const std::vector<int64_t>& dims) { return tensor(dt, dims, contiguous(dims), true); }

  static std::vector<int64_t> contiguous(const std::vector<int64_t>& dims) {
    std::vector<int64_t> s(dims.size(), 1);
    for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * dims[i + 1];
    return s;
  }

  // y = mode(x [, b] [, t]); GEN_INDEX takes `axis` (other modes have none: cuDNN reads it for GEN_INDEX only).
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t compute, const TensorDesc& x, const TensorDesc* b,
                 const TensorDesc& y, const TensorDesc* t = nullptr, int64_t axis = -1) {
    Desc pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR, "create pointwise descriptor");
    set(pw, CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, mode, "pointwise mode");
    set(pw, CUDNN_ATTR_POINTWISE_MATH_PREC, CUDNN_TYPE_DATA_TYPE, compute, "pointwise math precision");
    if (mode == CUDNN_POINTWISE_GEN_INDEX) set(pw, CUDNN_ATTR_POINTWISE_AXIS, CUDNN_TYPE_INT64, axis, "pointwise axis");
    finalize(pw, "finalize pointwise descriptor");
    Desc op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR, "create pointwise operation");
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw, "pointwise op descriptor");
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x.d, "pointwise x");
    if (b) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b->d, "pointwise b");
    if (t) set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t->d, "pointwise t");
    set_desc(op, CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y.d, "pointwise y");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, CUDNN_TYPE_FLOAT, 1.0f, "pointwise alpha1");
    set(op, CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, CUDNN_TYPE_FLOAT, 1.0f, "pointwise alpha2");
    finalize(op, "finalize pointwise operation");
    ops_.push_back(op);
  }
  TensorDesc pw(cudnnPointwiseMode_t mode, const TensorDesc& x, const TensorDesc* b, cudnnDataType_t out_dt,
                const std::vector<int64_t>& dims, cudnnDataType_t compute = CUDNN_DATA_FLOAT) {
    TensorDesc y = virt(out_dt, dims);
    pointwise(mode, compute, x, b, y);
    return y;
  }
  TensorDesc gen_index(const TensorDesc& x, const std::vector<int64_t>& dims, int64_t axis, cudnnDataType_t compute) {
    TensorDesc y = virt(CUDNN_DATA_INT32, dims);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, compute, x, nullptr, y, nullptr, axis);
    return y;
  }
  void matmul(const TensorDesc& a, const TensorDesc& b, const TensorDesc& c) {
    Desc mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR, "create matmul descriptor");
    set(mm, CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "matmul compute type");
    finalize(mm, "finalize matmul descriptor");
    Desc op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR, "create matmul operation");
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_ADESC, a.d, "matmul a");
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_BDESC, b.d, "matmul b");
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_CDESC, c.d, "matmul c");
    set_desc(op, CUDNN_ATTR_OPERATION_MATMUL_DESC, mm, "matmul descriptor");
    finalize(op, "finalize matmul operation");
    ops_.push_back(op);
  }
  void reduction(cudnnReduceTensorOp_t mode, const TensorDesc& x, const TensorDesc& y) {
    Desc rd = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR, "create reduction descriptor");
    set(rd, CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, mode, "reduction operator");
    set(rd, CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_DATA_FLOAT, "reduction compute type");
    finalize(rd, "finalize reduction descriptor");
    Desc op = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR, "create reduction operation");
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x.d, "reduction x");
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y.d, "reduction y");
    set_desc(op, CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd, "reduction descriptor");
    finalize(op, "finalize reduction operation");
    ops_.push_back(op);
  }
  void reshape(const TensorDesc& x, const TensorDesc& y) {
    Desc op = make(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR, "create reshape operation");
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x.d, "reshape x");
    set_desc(op, CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y.d, "reshape y");
    finalize(op, "finalize reshape operation");
    ops_.push_back(op);
  }

  // The operation graph, then the first engine configuration of heuristics mode A that finalizes.
  // The first engine configuration of heuristics mode A that finalizes; with `deterministic`, configurations whose
  // engine carries CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC are skipped (and counted in `nondeterministic`).
  Desc plan(cudnnHandle_t handle, bool deterministic, std::string& why, int64_t& nondeterministic) {
    Desc graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, "create operation graph");
    std::vector<cudnnBackendDescriptor_t> raw;
    for (const Desc& o : ops_) raw.push_back(o.get());
    set(graph, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, handle, "graph handle");
    set_n(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, raw, "graph operations");
    finalize(graph, "finalize operation graph");
    Desc heur = make(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, "create heuristics");
    set_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph, "heuristics graph");
    set(heur, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, CUDNN_HEUR_MODE_A, "heuristics mode");
    finalize(heur, "finalize heuristics");
    int64_t count = 0;
    FG_CUDNN(api().get_attr(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
             "count heuristics results");
    std::vector<Desc> cfgs;
    std::vector<cudnnBackendDescriptor_t> cfg_raw;
    for (int64_t i = 0; i < count; ++i) {
      cfgs.push_back(make(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, "create engine config"));
      cfg_raw.push_back(cfgs.back().get());
    }
    int64_t got = 0;
    if (count > 0) {
      FG_CUDNN(api().get_attr(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                              cfg_raw.data()),
               "get heuristics results");
    }
    for (int64_t i = 0; i < got; ++i) {
      if (deterministic && !is_deterministic(cfgs[i])) {
        ++nondeterministic;
        why += fmt::format("engine config {}: nondeterministic; ", i);
        continue;
      }
      Desc p = make(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, "create execution plan");
      set(p, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, handle, "plan handle");
      set_desc(p, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfgs[i], "plan engine config");
      const cudnnStatus_t s = api().finalize(p.get());
      if (s == CUDNN_STATUS_SUCCESS) return p;
      char msg[1024] = {0};
      api().last_error(msg, sizeof msg);
      why += fmt::format("engine config {}: {} ({}); ", i, api().error_string(s), msg);
    }
    if (got == 0) why += "heuristics returned no engine configuration; ";
    return nullptr;
  }

 private:
  // Whether the configuration's engine lacks the nondeterministic numerical note (CUDNN_ATTR_ENGINECFG_ENGINE, then
  // the engine's CUDNN_ATTR_ENGINE_NUMERICAL_NOTE list).
  static bool is_deterministic(const Desc& cfg) {
    Desc engine = make(CUDNN_BACKEND_ENGINE_DESCRIPTOR, "create engine descriptor");
    cudnnBackendDescriptor_t raw = engine.get();
    int64_t n = 0;
    FG_CUDNN(api().get_attr(cfg.get(), CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &raw),
             "get engine of engine config");
    cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
    n = 0;
    FG_CUDNN(api().get_attr(raw, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                            CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &n, notes),
             "get engine numerical notes");
    for (int64_t j = 0; j < n && j < CUDNN_NUMERICAL_NOTE_TYPE_COUNT; ++j) {
      if (notes[j] == CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC) return false;
    }
    return true;
  }

  std::vector<Desc> ops_;
  std::map<int64_t, TensorDesc> scalars_;
  int64_t next_virtual_ = 1 << 20;  // above every fixed uid (Uid, kConst + instruction)
};

// ---------------------------------------------------------------- uids of the non-virtual tensors
enum Uid : int64_t {
  kQ = 1, kK, kV, kO, kStats, kBias, kSlopes, kDO, kDQ, kDK, kDV, kDBias, kSoftmaxSum, kDQAccum,
  kScale = 50, kNegInf, kLeft, kRight, kOne, kZero,
  kConst = 1000,  // + instruction index: the pointwise score_mod's constants
};

cudnnDataType_t cudnn_dtype(DType d) {
  if (d == kBFloat16) return CUDNN_DATA_BFLOAT16;
  if (d == kFloat16) return CUDNN_DATA_HALF;
  FG_FAIL(DTypeError, "cuDNN SDPA: dtype {} (bfloat16 or float16 expected)", d);
}

std::vector<int64_t> dims_of(const Tensor& t) { return std::vector<int64_t>(t.sizes().begin(), t.sizes().end()); }
std::vector<int64_t> strides_of(const Tensor& t) {
  std::vector<int64_t> s(t.strides().begin(), t.strides().end());
  for (size_t i = 0; i < s.size(); ++i) if (t.size(static_cast<int64_t>(i)) == 1 && s[i] == 0) s[i] = 1;
  return s;
}
// [.., L, D] as the transposed [.., D, L] (same memory).
std::pair<std::vector<int64_t>, std::vector<int64_t>> transposed(const Tensor& t) {
  auto d = dims_of(t), s = strides_of(t);
  std::swap(d[2], d[3]);
  std::swap(s[2], s[3]);
  return {d, s};
}

// ---------------------------------------------------------------- the pointwise score_mod
// cuDNN's mode for an op table row's name (OpInfo::cudnn).
cudnnPointwiseMode_t pointwise_mode(ExprOp op) {
  static const std::map<std::string, cudnnPointwiseMode_t> kModes = {
      {"ADD", CUDNN_POINTWISE_ADD}, {"SUB", CUDNN_POINTWISE_SUB}, {"MUL", CUDNN_POINTWISE_MUL},
      {"DIV", CUDNN_POINTWISE_DIV}, {"POW", CUDNN_POINTWISE_POW}, {"MIN", CUDNN_POINTWISE_MIN},
      {"MAX", CUDNN_POINTWISE_MAX}, {"NEG", CUDNN_POINTWISE_NEG}, {"ABS", CUDNN_POINTWISE_ABS},
      {"EXP", CUDNN_POINTWISE_EXP}, {"LOG", CUDNN_POINTWISE_LOG}, {"SQRT", CUDNN_POINTWISE_SQRT},
      {"RSQRT", CUDNN_POINTWISE_RSQRT}, {"SIN", CUDNN_POINTWISE_SIN}, {"COS", CUDNN_POINTWISE_COS},
      {"TAN", CUDNN_POINTWISE_TAN}, {"TANH_FWD", CUDNN_POINTWISE_TANH_FWD},
      {"SIGMOID_FWD", CUDNN_POINTWISE_SIGMOID_FWD}, {"FLOOR", CUDNN_POINTWISE_FLOOR}, {"CEIL", CUDNN_POINTWISE_CEIL},
      {"IDENTITY", CUDNN_POINTWISE_IDENTITY}, {"CMP_EQ", CUDNN_POINTWISE_CMP_EQ}, {"CMP_NEQ", CUDNN_POINTWISE_CMP_NEQ},
      {"CMP_LT", CUDNN_POINTWISE_CMP_LT}, {"CMP_LE", CUDNN_POINTWISE_CMP_LE}, {"CMP_GT", CUDNN_POINTWISE_CMP_GT},
      {"CMP_GE", CUDNN_POINTWISE_CMP_GE}, {"LOGICAL_AND", CUDNN_POINTWISE_LOGICAL_AND},
      {"LOGICAL_OR", CUDNN_POINTWISE_LOGICAL_OR}, {"LOGICAL_NOT", CUDNN_POINTWISE_LOGICAL_NOT},
      {"BINARY_SELECT", CUDNN_POINTWISE_BINARY_SELECT},
  };
  const char* name = op_info(op).cudnn;
  auto it = name ? kModes.find(name) : kModes.end();
  FG_CHECK(it != kModes.end(), ValueError, "cuDNN SDPA: op {} has no cuDNN pointwise mode (op table: {})",
           expr_op_name(op), name ? name : "none");
  return it->second;
}

cudnnDataType_t kind_dtype(ValueKind k) {
  return k == ValueKind::Float ? CUDNN_DATA_FLOAT : k == ValueKind::Int ? CUDNN_DATA_INT32 : CUDNN_DATA_BOOLEAN;
}

// The by-value constants of the pointwise program: instruction i's value travels under uid kConst + i.
struct PointwiseConsts {
  std::vector<float> f;
  std::vector<int32_t> i;
};
PointwiseConsts pointwise_consts(const ModProgram& p) {
  PointwiseConsts c{std::vector<float>(p.size()), std::vector<int32_t>(p.size())};
  for (size_t k = 0; k < p.size(); ++k) {
    const Instr& x = p.instrs()[k];
    if (x.op != ExprOp::Const) continue;
    c.f[k] = static_cast<float>(x.value);
    c.i[k] = static_cast<int32_t>(x.ivalue);  // lower_to_cudnn bounds int constants to int32
  }
  return c;
}

// Whether the live program has a where() between two constants (pointwise_program then reads kZero).
bool pointwise_needs_zero(const ModProgram& p, const std::vector<char>& live) {
  for (size_t k = 0; k < p.size(); ++k) {
    const Instr& x = p.instrs()[k];
    if (live[k] && x.op == ExprOp::Where && p.instrs()[static_cast<size_t>(x.args[1])].op == ExprOp::Const &&
        p.instrs()[static_cast<size_t>(x.args[2])].op == ExprOp::Const) {
      return true;
    }
  }
  return false;
}

// The instructions a direction's graph evaluates: the forward's output 0 (the score_mod), the backward's both.
std::vector<char> pointwise_live(const ModProgram& p, bool backward) {
  std::vector<int32_t> outputs{p.outputs()[0]};
  if (backward) outputs.push_back(p.outputs()[1]);
  return p.live(outputs);
}

// The program on the scaled scores `s` (dims sd) as pointwise operations; returns each instruction's tensor
// (constants as by-value [1,1,1,1] scalars). Operand order: cuDNN broadcasts the second operand (b), so a
// constant never goes first: commutative ops swap, c - x is (-x) + c, c / x is (1 / x) * c, comparisons flip,
// where(m, c, x) is where(!m, x, c), and where(m, c1, c2) is where(m, kv_idx * 0 + c1, c2): built from the generated
// index, never from the scores, which cuDNN's engines also compute on padding, where they are not finite (c ** x is
// declined by lower_to_cudnn). Only the instructions the direction needs (pointwise_live) are emitted: cuDNN rejects
// a graph with a virtual tensor nothing reads.
std::vector<TensorDesc> pointwise_program(GraphBuilder& g, const ModProgram& p, bool backward, const TensorDesc& s,
                                          const std::vector<int64_t>& sd) {
  const std::vector<char> live = pointwise_live(p, backward);
  std::vector<TensorDesc> v(p.size());
  std::vector<bool> scalar(p.size(), false);
  auto op2 = [&](cudnnPointwiseMode_t mode, ValueKind out, ValueKind compute, const TensorDesc& a, const TensorDesc& b,
                 const TensorDesc* t = nullptr) {
    TensorDesc y = g.virt(kind_dtype(out), sd);
    g.pointwise(mode, kind_dtype(compute), a, &b, y, t);
    return y;
  };
  for (size_t k = 0; k < p.size(); ++k) {
    const Instr& x = p.instrs()[k];
    if (!live[k]) continue;
    auto arg = [&](size_t j) -> const TensorDesc& { return v[static_cast<size_t>(x.args[j])]; };
    auto is_scalar = [&](size_t j) { return scalar[static_cast<size_t>(x.args[j])]; };
    auto operand_kind = [&](size_t j) { return p.instrs()[static_cast<size_t>(x.args[j])].kind; };
    switch (x.op) {
      case ExprOp::Score: v[k] = s; continue;
      case ExprOp::Batch: v[k] = g.gen_index(s, sd, 0, CUDNN_DATA_INT32); continue;
      case ExprOp::Head: v[k] = g.gen_index(s, sd, 1, CUDNN_DATA_INT32); continue;
      case ExprOp::QIdx: v[k] = g.gen_index(s, sd, 2, CUDNN_DATA_INT32); continue;
      case ExprOp::KVIdx: v[k] = g.gen_index(s, sd, 3, CUDNN_DATA_INT32); continue;
      case ExprOp::Const:
        v[k] = g.scalar(kind_dtype(x.kind), kConst + static_cast<int64_t>(k));
        scalar[k] = true;
        continue;
      default: break;
    }
    const cudnnPointwiseMode_t mode = pointwise_mode(x.op);
    const ValueKind compute = x.op == ExprOp::Where ? x.kind : operand_kind(x.args.size() - 1);
    if (x.args.size() == 1) {
      TensorDesc y = g.virt(kind_dtype(x.kind), sd);
      g.pointwise(mode, kind_dtype(x.op == ExprOp::Cast ? x.kind : compute), arg(0), nullptr, y);
      v[k] = y;
      continue;
    }
    if (x.op == ExprOp::Where) {
      if (is_scalar(1) && is_scalar(2)) {  // where(m, c1, c2) (a derivative's usual form): c1 as kv_idx * 0 + c1
        TensorDesc zero = g.scalar(CUDNN_DATA_FLOAT, kZero);
        TensorDesc zeros = g.pw(CUDNN_POINTWISE_MUL, g.gen_index(s, sd, 3, CUDNN_DATA_INT32), &zero,
                                kind_dtype(x.kind), sd, kind_dtype(x.kind));
        TensorDesc c1 = g.pw(CUDNN_POINTWISE_ADD, zeros, &arg(1), kind_dtype(x.kind), sd, kind_dtype(x.kind));
        v[k] = op2(mode, x.kind, compute, c1, arg(2), &arg(0));
      } else if (is_scalar(1)) {
        TensorDesc negated = g.virt(CUDNN_DATA_BOOLEAN, sd);
        g.pointwise(CUDNN_POINTWISE_LOGICAL_NOT, CUDNN_DATA_BOOLEAN, arg(0), nullptr, negated);
        v[k] = op2(mode, x.kind, compute, arg(2), arg(1), &negated);
      } else {
        v[k] = op2(mode, x.kind, compute, arg(1), arg(2), &arg(0));
      }
      continue;
    }
    const ValueKind cmp_compute = x.kind == ValueKind::Bool ? ValueKind::Bool : compute;
    if (!is_scalar(0)) {
      v[k] = op2(mode, x.kind, cmp_compute, arg(0), arg(1));
      continue;
    }
    switch (x.op) {  // a constant first operand
      case ExprOp::Add: case ExprOp::Mul: case ExprOp::Min: case ExprOp::Max: case ExprOp::Eq: case ExprOp::Ne:
      case ExprOp::And: case ExprOp::Or:
        v[k] = op2(mode, x.kind, cmp_compute, arg(1), arg(0));
        break;
      case ExprOp::Lt: v[k] = op2(CUDNN_POINTWISE_CMP_GT, x.kind, cmp_compute, arg(1), arg(0)); break;
      case ExprOp::Le: v[k] = op2(CUDNN_POINTWISE_CMP_GE, x.kind, cmp_compute, arg(1), arg(0)); break;
      case ExprOp::Gt: v[k] = op2(CUDNN_POINTWISE_CMP_LT, x.kind, cmp_compute, arg(1), arg(0)); break;
      case ExprOp::Ge: v[k] = op2(CUDNN_POINTWISE_CMP_LE, x.kind, cmp_compute, arg(1), arg(0)); break;
      case ExprOp::Sub: {
        TensorDesc neg = g.virt(kind_dtype(x.kind), sd);
        g.pointwise(CUDNN_POINTWISE_NEG, kind_dtype(compute), arg(1), nullptr, neg);
        v[k] = op2(CUDNN_POINTWISE_ADD, x.kind, compute, neg, arg(0));
        break;
      }
      case ExprOp::Div: {
        TensorDesc inv = g.virt(CUDNN_DATA_FLOAT, sd);
        g.pointwise(CUDNN_POINTWISE_RECIPROCAL, CUDNN_DATA_FLOAT, arg(1), nullptr, inv);
        v[k] = op2(CUDNN_POINTWISE_MUL, x.kind, compute, inv, arg(0));
        break;
      }
      default:
        FG_FAIL(ValueError, "cuDNN SDPA: {} with a constant first operand has no cuDNN pointwise form",
                expr_op_name(x.op));
    }
  }
  return v;
}

// The scores' modifications shared by both directions: * scale, the pointwise score_mod, + bias, + ALiBi (cuDNN's
// order; the lowering never gives both a pointwise score_mod and a bias). Returns the modified S; with a pointwise
// score_mod, *dscore (when not null) receives d score_mod / d score at the scaled S.
TensorDesc scores(GraphBuilder& g, const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const TensorDesc& s0,
                  const TensorDesc& scale, const std::vector<int64_t>& sd, cudnnDataType_t io,
                  TensorDesc* dscore = nullptr) {
  TensorDesc s = g.pw(CUDNN_POINTWISE_MUL, s0, &scale, CUDNN_DATA_FLOAT, sd);
  if (spec.pointwise) {
    const std::vector<TensorDesc> v = pointwise_program(g, *spec.pointwise, dscore != nullptr, s, sd);
    if (dscore) *dscore = v[static_cast<size_t>(spec.pointwise->outputs()[1])];
    s = v[static_cast<size_t>(spec.pointwise->outputs()[0])];
  }
  if (spec.bias == CudnnSdpaSpec::Bias::Tensor) {
    TensorDesc bias = g.tensor(io, dims_of(t.bias), strides_of(t.bias), false, kBias);
    s = g.pw(CUDNN_POINTWISE_ADD, s, &bias, CUDNN_DATA_FLOAT, sd);
  } else if (spec.bias == CudnnSdpaSpec::Bias::Alibi) {
    TensorDesc row = g.gen_index(s, sd, 2, CUDNN_DATA_INT32), col = g.gen_index(s, sd, 3, CUDNN_DATA_INT32);
    TensorDesc dist = g.pw(CUDNN_POINTWISE_SUB, col, &row, CUDNN_DATA_INT32, sd, CUDNN_DATA_INT32);
    const int64_t H = sd[1];
    TensorDesc slopes = g.tensor(CUDNN_DATA_FLOAT, {1, H, 1, 1}, {H, 1, 1, 1}, false, kSlopes);
    TensorDesc ab = g.pw(CUDNN_POINTWISE_MUL, dist, &slopes, CUDNN_DATA_FLOAT, sd);
    s = g.pw(CUDNN_POINTWISE_ADD, s, &ab, CUDNN_DATA_FLOAT, sd);
  }
  return s;
}

// The band: select(row + r >= col, S, -inf) then select(col + l > row, S, -inf).
TensorDesc band(GraphBuilder& g, const CudnnSdpaSpec& spec, TensorDesc s, const std::vector<int64_t>& sd) {
  if (spec.right_bound || spec.left_bound) {
    TensorDesc neg_inf = g.scalar(CUDNN_DATA_FLOAT, kNegInf);
    if (spec.right_bound) {
      TensorDesc row = g.gen_index(s, sd, 2, CUDNN_DATA_FLOAT), col = g.gen_index(s, sd, 3, CUDNN_DATA_FLOAT);
      if (*spec.right_bound != 0) {
        TensorDesc r = g.scalar(CUDNN_DATA_INT32, kRight);
        TensorDesc shifted = g.virt(CUDNN_DATA_INT32, sd);
        g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_INT32, row, &r, shifted);
        row = shifted;
      }
      TensorDesc keep = g.pw(CUDNN_POINTWISE_CMP_GE, row, &col, CUDNN_DATA_BOOLEAN, sd, CUDNN_DATA_BOOLEAN);
      TensorDesc y = g.virt(CUDNN_DATA_FLOAT, sd);
      g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, &neg_inf, y, &keep);
      s = y;
    }
    if (spec.left_bound) {
      TensorDesc row = g.gen_index(s, sd, 2, CUDNN_DATA_FLOAT), col = g.gen_index(s, sd, 3, CUDNN_DATA_FLOAT);
      TensorDesc l = g.scalar(CUDNN_DATA_FLOAT, kLeft);
      TensorDesc shifted = g.virt(CUDNN_DATA_FLOAT, sd);
      g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, col, &l, shifted);
      TensorDesc keep = g.pw(CUDNN_POINTWISE_CMP_GT, shifted, &row, CUDNN_DATA_BOOLEAN, sd, CUDNN_DATA_BOOLEAN);
      TensorDesc y = g.virt(CUDNN_DATA_FLOAT, sd);
      g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s, &neg_inf, y, &keep);
      s = y;
    }
  }
  return s;
}

// ---------------------------------------------------------------- handles and plans
// A built plan, or (plan null) why none could be built: a failure is cached too, so Auto's question "can cuDNN run
// this?" (cudnn_plan_check) costs one graph build per key.
struct Plan {
  Desc plan;
  int64_t workspace = 0;
  int64_t extra = 0;  // bytes of our own non-virtual intermediates placed after cuDNN's workspace
  std::string error;  // the NotImplementedError message when plan is null
};

cudnnHandle_t handle_for(int device) {
  static std::mutex mu;
  static auto* handles = new std::map<int, cudnnHandle_t>();  // never destroyed (see flex_attention.cpp's all_full)
  std::lock_guard lock(mu);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cuda::DeviceGuard guard(device);
  cudnnHandle_t h = nullptr;
  FG_CUDNN(api().create(&h), "cudnnCreate");
  handles->emplace(device, h);
  return h;
}

std::string shape_key(const Tensor& t) {
  return t.defined() ? fmt::format("{}/{}/{}", fmt::join(t.sizes(), "x"), fmt::join(t.strides(), "x"), t.dtype()) : "-";
}

std::mutex g_plan_mu;
std::map<std::string, std::shared_ptr<Plan>>& plan_cache() {
  static auto* cache = new std::map<std::string, std::shared_ptr<Plan>>();
  return *cache;
}

template <class Build>
std::shared_ptr<Plan> cached_plan(const std::string& key, Build&& build) {
  {
    std::lock_guard lock(g_plan_mu);
    auto it = plan_cache().find(key);
    if (it != plan_cache().end()) return it->second;
  }
  std::shared_ptr<Plan> p = build();
  std::lock_guard lock(g_plan_mu);
  if (plan_cache().size() >= 256) plan_cache().clear();  // bounded: a few shapes recur, not thousands
  plan_cache().emplace(key, p);
  return p;
}

void run_plan(cudnnHandle_t handle, const Plan& p, std::vector<int64_t> uids, std::vector<void*> ptrs, int device,
              const std::vector<std::pair<int64_t, int64_t>>& in_workspace = {}) {
  cuda::Workspace ws(static_cast<size_t>(p.workspace + p.extra), device);
  for (const auto& [uid, offset] : in_workspace) {
    uids.push_back(uid);
    ptrs.push_back(static_cast<char*>(ws.get()) + p.workspace + offset);
  }
  Desc pack = make(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, "create variant pack");
  set_n(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, uids, "variant pack uids");
  set_n(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, ptrs, "variant pack pointers");
  void* w = ws.get();
  set(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, w, "variant pack workspace");
  finalize(pack, "finalize variant pack");
  FG_CUDNN(api().set_stream(handle, cuda::stream(device)), "cudnnSetStream");
  FG_CUDNN(api().execute(handle, p.plan.get(), pack.get()), "cudnnBackendExecute");
}

std::shared_ptr<Plan> finish(GraphBuilder& g, cudnnHandle_t handle, const char* direction, const CudnnSdpaSpec& spec,
                             int64_t extra, bool deterministic = false) {
  std::string why;
  int64_t nondeterministic = 0;
  Desc p = g.plan(handle, deterministic, why, nondeterministic);
  auto plan = std::make_shared<Plan>();
  if (!p) {
    plan->error = deterministic && nondeterministic > 0
                      ? fmt::format("flex_attention (cuDNN backend): cuDNN {} has no deterministic engine for the SDPA "
                                    "{} graph of '{}' (kernel.deterministic = false allows the nondeterministic ones): "
                                    "{}", api().version, direction, spec.describe(), why)
                      : fmt::format("flex_attention (cuDNN backend): cuDNN {} has no engine for the SDPA {} graph of "
                                    "'{}': {}", api().version, direction, spec.describe(), why);
    return plan;
  }
  plan->plan = p;
  FG_CUDNN(api().get_attr(p.get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, nullptr,
                          &plan->workspace),
           "get plan workspace size");
  plan->workspace = (plan->workspace + 255) / 256 * 256;
  plan->extra = extra;
  return plan;
}

struct Scalars {
  float scale = 1, neg_inf = -std::numeric_limits<float>::infinity(), left = 0, one = 1, zero = 0;
  int32_t right = 0;
  PointwiseConsts consts;
};
void add_scalars(const CudnnSdpaSpec& spec, bool backward, Scalars& s, std::vector<int64_t>& uids,
                 std::vector<void*>& ptrs) {
  uids.push_back(kScale);
  ptrs.push_back(&s.scale);
  if (spec.pointwise) {
    s.consts = pointwise_consts(*spec.pointwise);
    const std::vector<char> live = pointwise_live(*spec.pointwise, backward);
    if (pointwise_needs_zero(*spec.pointwise, live)) {
      uids.push_back(kZero);
      ptrs.push_back(&s.zero);
    }
    for (size_t k = 0; k < spec.pointwise->size(); ++k) {
      const Instr& x = spec.pointwise->instrs()[k];
      if (x.op != ExprOp::Const || !live[k]) continue;
      uids.push_back(kConst + static_cast<int64_t>(k));
      ptrs.push_back(x.kind == ValueKind::Float ? static_cast<void*>(&s.consts.f[k]) : &s.consts.i[k]);
    }
  }
  if (spec.right_bound || spec.left_bound) {
    uids.push_back(kNegInf);
    ptrs.push_back(&s.neg_inf);
  }
  if (spec.right_bound && *spec.right_bound != 0) {
    s.right = static_cast<int32_t>(*spec.right_bound);
    uids.push_back(kRight);
    ptrs.push_back(&s.right);
  }
  if (spec.left_bound) {
    s.left = static_cast<float>(*spec.left_bound);
    uids.push_back(kLeft);
    ptrs.push_back(&s.left);
  }
}
// The backward graph's own scalar: kOne (softmax_sum).
void add_backward_scalars(Scalars& s, std::vector<int64_t>& uids, std::vector<void*>& ptrs) {
  uids.push_back(kOne);
  ptrs.push_back(&s.one);
}
void add_bias_inputs(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, std::vector<int64_t>& uids,
                     std::vector<void*>& ptrs) {
  if (spec.bias == CudnnSdpaSpec::Bias::Tensor) {
    uids.push_back(kBias);
    ptrs.push_back(t.bias.data_ptr());
  } else if (spec.bias == CudnnSdpaSpec::Bias::Alibi) {
    uids.push_back(kSlopes);
    ptrs.push_back(t.slopes.data_ptr());
  }
}

// The forward graph's operations (no handle needed: every descriptor is finalized as it is built).
void build_forward(GraphBuilder& g, const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t) {
  const cudnnDataType_t io = cudnn_dtype(t.q.dtype());
  const int64_t B = t.q.size(0), Hq = t.q.size(1), Lq = t.q.size(2), Lkv = t.k.size(2);
  const std::vector<int64_t> sd{B, Hq, Lq, Lkv}, rd{B, Hq, Lq, 1};
  TensorDesc q = g.tensor(io, dims_of(t.q), strides_of(t.q), false, kQ);
  auto [kd, ks] = transposed(t.k);
  TensorDesc kt = g.tensor(io, kd, ks, false, kK);
  TensorDesc v = g.tensor(io, dims_of(t.v), strides_of(t.v), false, kV);
  TensorDesc o = g.tensor(io, dims_of(t.out), strides_of(t.out), false, kO);
  TensorDesc stats = g.tensor(CUDNN_DATA_FLOAT, rd, {Hq * Lq, Lq, 1, 1}, false, kStats);
  TensorDesc s = g.virt(CUDNN_DATA_FLOAT, sd);
  g.matmul(q, kt, s);
  TensorDesc scale = g.scalar(CUDNN_DATA_FLOAT, kScale);
  s = band(g, spec, scores(g, spec, t, s, scale, sd, io), sd);
  TensorDesc mx = g.virt(CUDNN_DATA_FLOAT, rd);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s, mx);
  TensorDesc sub = g.pw(CUDNN_POINTWISE_SUB, s, &mx, CUDNN_DATA_FLOAT, sd);
  TensorDesc ex = g.pw(CUDNN_POINTWISE_EXP, sub, nullptr, CUDNN_DATA_FLOAT, sd);
  TensorDesc sum = g.virt(CUDNN_DATA_FLOAT, rd);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, ex, sum);
  TensorDesc lg = g.pw(CUDNN_POINTWISE_LOG, sum, nullptr, CUDNN_DATA_FLOAT, rd);
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, &lg, stats);
  TensorDesc p = g.pw(CUDNN_POINTWISE_DIV, ex, &sum, io, sd);  // bmm2's A in the I/O type, as cuDNN requires
  g.matmul(p, v, o);
}

// The gradients' dims and strides (in q's dtype): the backward plan is built from these, so Auto can build it at
// forward time (cudnn_plan_check) from the contiguous layouts flex_attention's backward allocates.
struct Layout {
  std::vector<int64_t> dims, strides;
};
Layout layout_of(const Tensor& t) { return {dims_of(t), strides_of(t)}; }
Layout contiguous_like(const Tensor& t) { return {dims_of(t), GraphBuilder::contiguous(dims_of(t))}; }
std::string layout_key(const Layout& l) { return fmt::format("{}/{}", fmt::join(l.dims, "x"), fmt::join(l.strides, "x")); }
struct GradLayouts {
  Layout dout, dq, dk, dv, dbias;
  bool dbias_on = false;
};

// The backward graph's operations; dq_accum: dQ through the float accumulator (kDQAccum).
void build_backward(GraphBuilder& g, const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const GradLayouts& gr,
                    bool dq_accum) {
  const bool dbias = gr.dbias_on;
  const cudnnDataType_t io = cudnn_dtype(t.q.dtype());
  const int64_t B = t.q.size(0), Hq = t.q.size(1), Lq = t.q.size(2), E = t.q.size(3);
  const int64_t Hkv = t.k.size(1), Lkv = t.k.size(2), Ev = t.v.size(3);
  const std::vector<int64_t> sd{B, Hq, Lq, Lkv}, rd{B, Hq, Lq, 1};
  TensorDesc q = g.tensor(io, dims_of(t.q), strides_of(t.q), false, kQ);
  auto [kd, ks] = transposed(t.k);
  TensorDesc kt = g.tensor(io, kd, ks, false, kK);
  auto [vd, vs] = transposed(t.v);
  TensorDesc vt = g.tensor(io, vd, vs, false, kV);
  TensorDesc o = g.tensor(io, dims_of(t.out), strides_of(t.out), false, kO);
  TensorDesc stats = g.tensor(CUDNN_DATA_FLOAT, rd, {Hq * Lq, Lq, 1, 1}, false, kStats);
  TensorDesc dout = g.tensor(io, gr.dout.dims, gr.dout.strides, false, kDO);
  TensorDesc dq = g.tensor(io, gr.dq.dims, gr.dq.strides, false, kDQ);
  TensorDesc dk = g.tensor(io, gr.dk.dims, gr.dk.strides, false, kDK);
  TensorDesc dv = g.tensor(io, gr.dv.dims, gr.dv.strides, false, kDV);
  TensorDesc one = g.scalar(CUDNN_DATA_FLOAT, kOne);
  // softmax_sum = rowsum(dO * O), kept (non-virtual) in the workspace.
  TensorDesc dodo = g.pw(CUDNN_POINTWISE_MUL, dout, &o, CUDNN_DATA_FLOAT, {B, Hq, Lq, Ev});
  TensorDesc rs = g.virt(CUDNN_DATA_FLOAT, rd);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, dodo, rs);
  TensorDesc softmax_sum = g.tensor(CUDNN_DATA_FLOAT, rd, {Hq * Lq, Lq, 1, 1}, false, kSoftmaxSum);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, rs, &one, softmax_sum);
  // A product into a K/V-head gradient (Lkv x cols): with GQA it runs over the query heads and sums each group.
  auto matmul_to_kv_heads = [&](const TensorDesc& a, const TensorDesc& b, const TensorDesc& out, int64_t cols) {
    if (Hq == Hkv) {
      g.matmul(a, b, out);
      return;
    }
    TensorDesc full = g.virt(io, {B, Hq, Lkv, cols});
    g.matmul(a, b, full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, full, out);
  };
  // P = exp(S - stats) under the band.
  TensorDesc s = g.virt(CUDNN_DATA_FLOAT, sd);
  g.matmul(q, kt, s);
  TensorDesc scale = g.scalar(CUDNN_DATA_FLOAT, kScale);  // one descriptor per uid: S's scale and dS's
  TensorDesc dscore;
  s = scores(g, spec, t, s, scale, sd, io, &dscore);
  s = g.pw(CUDNN_POINTWISE_SUB, s, &stats, CUDNN_DATA_FLOAT, sd);
  s = band(g, spec, s, sd);
  TensorDesc p = g.pw(CUDNN_POINTWISE_EXP, s, nullptr, CUDNN_DATA_FLOAT, sd);
  const std::vector<int64_t> td{B, Hq, Lkv, Lq}, ts{Hq * Lq * Lkv, Lq * Lkv, 1, Lkv};
  TensorDesc pt = g.tensor(io, td, ts, true);
  g.reshape(p, pt);
  matmul_to_kv_heads(pt, dout, dv, Ev);
  // dS = (dO V^T - softmax_sum) * P [dBias = sum], * scale.
  TensorDesc dp = g.virt(CUDNN_DATA_FLOAT, sd);
  g.matmul(dout, vt, dp);
  dp = g.pw(CUDNN_POINTWISE_SUB, dp, &softmax_sum, CUDNN_DATA_FLOAT, sd);
  TensorDesc ds = g.pw(CUDNN_POINTWISE_MUL, dp, &p, CUDNN_DATA_FLOAT, sd);
  if (dbias) {
    TensorDesc db = g.tensor(io, gr.dbias.dims, gr.dbias.strides, false, kDBias);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, ds, db);
  }
  if (spec.pointwise) {
    // The score-modifier's backward chain: dS w.r.t. the scaled score. (cuDNN 9.19 builds no engine when this chain
    // holds a select, so the lowering admits only derivatives that stay finite on the infinite scores cuDNN computes
    // on padding, where dS is 0: see lower_pointwise.)
    ds = g.pw(CUDNN_POINTWISE_MUL, ds, &dscore, CUDNN_DATA_FLOAT, sd);
  }
  ds = g.pw(CUDNN_POINTWISE_MUL, ds, &scale, CUDNN_DATA_FLOAT, sd);
  TensorDesc dst = g.tensor(io, td, ts, true);
  g.reshape(ds, dst);
  matmul_to_kv_heads(dst, q, dk, E);
  // dQ = dS K (K back from K^T by a reshape).
  TensorDesc kn = g.tensor(io, dims_of(t.k), strides_of(t.k), true);
  g.reshape(kt, kn);
  if (dq_accum) {
    TensorDesc acc = g.tensor(CUDNN_DATA_FLOAT, {B, Hq, Lq, E}, GraphBuilder::contiguous({B, Hq, Lq, E}), false,
                              kDQAccum);
    g.matmul(ds, kn, acc);
    g.pointwise(CUDNN_POINTWISE_IDENTITY, CUDNN_DATA_FLOAT, acc, nullptr, dq);
  } else {
    g.matmul(ds, kn, dq);
  }
}

// ---------------------------------------------------------------- plans
// Graph building raises (a descriptor cuDNN rejects) become the plan's error, so a failure is cached and asked about
// like a missing engine.
template <class Build>
std::shared_ptr<Plan> build_or_error(Build&& build) {
  try {
    return build();
  } catch (const Error& e) {
    auto p = std::make_shared<Plan>();
    p->error = e.what();
    return p;
  }
}

std::shared_ptr<Plan> forward_plan(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, cudnnHandle_t handle,
                                   int device) {
  const std::string key = fmt::format("fwd|{}|{}|{}|{}|{}|{}|{}|{}", spec.describe(), shape_key(t.q), shape_key(t.k),
                                      shape_key(t.v), shape_key(t.out), shape_key(t.bias), device, api().version);
  return cached_plan(key, [&] {
    return build_or_error([&] {
      GraphBuilder g;
      build_forward(g, spec, t);
      return finish(g, handle, "forward", spec, 0);
    });
  });
}

// dQ goes through a float accumulator in the workspace (cuDNN's engine adds into it with atomics: the order, and
// so the bits, vary run to run) except with dBias (cuDNN computes dBias only on the dP-workspace implementation,
// which writes dQ directly) and when deterministic: cudnn-frontend's set_deterministic_algorithm does the same on
// Hopper (it forces the dP-workspace graph; on Blackwell it picks engine knobs instead). Deterministic plans also
// accept only engines without CUDNN_NUMERICAL_NOTE_NONDETERMINISTIC.
bool uses_dq_accum(const GradLayouts& gl, bool deterministic) { return !gl.dbias_on && !deterministic; }
int64_t softmax_sum_bytes(const CudnnSdpaTensors& t) { return (t.q.size(0) * t.q.size(1) * t.q.size(2) * 4 + 255) / 256 * 256; }

std::shared_ptr<Plan> backward_plan(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const GradLayouts& gl,
                                    bool deterministic, cudnnHandle_t handle, int device) {
  const bool dq_accum = uses_dq_accum(gl, deterministic);
  const int64_t accum_bytes = dq_accum ? t.q.size(0) * t.q.size(1) * t.q.size(2) * t.q.size(3) * 4 : 0;
  const std::string key = fmt::format("bwd|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}", spec.describe(), shape_key(t.q),
                                      shape_key(t.k), shape_key(t.v), shape_key(t.out), layout_key(gl.dout),
                                      layout_key(gl.dq), layout_key(gl.dk), layout_key(gl.dv), shape_key(t.bias),
                                      gl.dbias_on ? layout_key(gl.dbias) : "-", deterministic ? "det" : "nondet", device,
                                      api().version);
  return cached_plan(key, [&] {
    if (!spec.pointwise_backward_declined.empty()) {
      auto p = std::make_shared<Plan>();
      p->error = fmt::format("flex_attention (cuDNN backend): no backward graph for {}", spec.pointwise_backward_declined);
      return p;
    }
    return build_or_error([&] {
      GraphBuilder g;
      build_backward(g, spec, t, gl, dq_accum);
      return finish(g, handle, "backward", spec, softmax_sum_bytes(t) + accum_bytes, deterministic);
    });
  });
}

// ---------------------------------------------------------------- forward
void cudnn_sdpa_forward(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t) {
  FG_CHECK(api().unavailable.empty(), NotImplementedError, "flex_attention (cuDNN backend): {}", api().unavailable);
  const int device = t.q.device().index;
  cuda::DeviceGuard guard(device);
  cudnnHandle_t handle = handle_for(device);
  auto plan = forward_plan(spec, t, handle, device);
  FG_CHECK(plan->plan != nullptr, NotImplementedError, "{}", plan->error);
  Scalars sc;
  sc.scale = static_cast<float>(t.scale);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kStats};
  std::vector<void*> ptrs{t.q.data_ptr(), t.k.data_ptr(), t.v.data_ptr(), t.out.data_ptr(), t.stats.data_ptr()};
  add_scalars(spec, /*backward=*/false, sc, uids, ptrs);
  add_bias_inputs(spec, t, uids, ptrs);
  run_plan(handle, *plan, uids, ptrs, device);
}

// ---------------------------------------------------------------- backward
void cudnn_sdpa_backward(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const CudnnSdpaGrads& gr) {
  FG_CHECK(api().unavailable.empty(), NotImplementedError, "flex_attention (cuDNN backend): {}", api().unavailable);
  const int device = t.q.device().index;
  cuda::DeviceGuard guard(device);
  cudnnHandle_t handle = handle_for(device);
  GradLayouts gl{layout_of(gr.dout), layout_of(gr.dq), layout_of(gr.dk), layout_of(gr.dv), {}, false};
  gl.dbias_on = spec.bias == CudnnSdpaSpec::Bias::Tensor && gr.dbias.defined();
  if (gl.dbias_on) gl.dbias = layout_of(gr.dbias);
  auto plan = backward_plan(spec, t, gl, gr.deterministic, handle, device);
  FG_CHECK(plan->plan != nullptr, NotImplementedError, "{}", plan->error);
  Scalars sc;
  sc.scale = static_cast<float>(t.scale);
  std::vector<int64_t> uids{kQ, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV};
  std::vector<void*> ptrs{t.q.data_ptr(), t.k.data_ptr(), t.v.data_ptr(), t.out.data_ptr(), t.stats.data_ptr(),
                          gr.dout.data_ptr(), gr.dq.data_ptr(), gr.dk.data_ptr(), gr.dv.data_ptr()};
  add_scalars(spec, /*backward=*/true, sc, uids, ptrs);
  add_backward_scalars(sc, uids, ptrs);
  add_bias_inputs(spec, t, uids, ptrs);
  if (gl.dbias_on) {
    uids.push_back(kDBias);
    ptrs.push_back(gr.dbias.data_ptr());
  }
  std::vector<std::pair<int64_t, int64_t>> in_ws{{kSoftmaxSum, 0}};
  if (uses_dq_accum(gl, gr.deterministic)) in_ws.push_back({kDQAccum, softmax_sum_bytes(t)});
  run_plan(handle, *plan, uids, ptrs, device, in_ws);
}

// Whether the forward plan (and, with `backward`, the backward plan for the contiguous gradients flex_attention
// allocates) builds: empty, or the error the run would raise. Both plans stay cached for the run.
std::string cudnn_plan_check(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, bool backward, bool dbias,
                             bool deterministic) {
  if (!api().unavailable.empty()) return api().unavailable;
  const int device = t.q.device().index;
  cuda::DeviceGuard guard(device);
  cudnnHandle_t handle = handle_for(device);
  auto fwd = forward_plan(spec, t, handle, device);
  if (!fwd->plan) return fwd->error;
  if (!backward) return {};
  GradLayouts gl{contiguous_like(t.out), contiguous_like(t.q), contiguous_like(t.k), contiguous_like(t.v), {}, false};
  gl.dbias_on = dbias && spec.bias == CudnnSdpaSpec::Bias::Tensor && t.bias.defined();
  if (gl.dbias_on) gl.dbias = contiguous_like(t.bias);
  auto bwd = backward_plan(spec, t, gl, deterministic, handle, device);
  return bwd->plan ? std::string() : bwd->error;
}

std::string cudnn_available(Device) { return api().unavailable; }
std::string cudnn_device_arch(Device device) { return cuda::jit::target_arch(device.index); }

}  // namespace

FG_REGISTER_KERNEL(cudnn_sdpa_forward_stub, CUDA, &cudnn_sdpa_forward);
FG_REGISTER_KERNEL(cudnn_sdpa_backward_stub, CUDA, &cudnn_sdpa_backward);
FG_REGISTER_KERNEL(cudnn_available_stub, CUDA, &cudnn_available);
FG_REGISTER_KERNEL(cudnn_plan_check_stub, CUDA, &cudnn_plan_check);
FG_REGISTER_KERNEL(cudnn_device_arch_stub, CUDA, &cudnn_device_arch);

}  // namespace fg
#endif  // FLEXGRAD_WITH_CUDNN
