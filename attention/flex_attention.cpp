// flex_attention: argument checks (PyTorch's messages), the choice of path, and the autograd node
// around the fused kernels (forward and backward side by side).
#include "flexgrad/attention/flex_attention.h"

#include <cmath>
#include <cstdlib>
#include <optional>
#include <map>
#include <mutex>
#include <tuple>
#include <string>
#include <vector>

#include "flexgrad/attention/cudnn_backend.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/attention/flex_reference.h"
#include "flexgrad/ops/autocast.h"
#include "flexgrad/ops/ops.h"

namespace fg {

FG_DEFINE_STUB(FlexForwardFn, flex_forward_stub);
FG_DEFINE_STUB(FlexBackwardFn, flex_backward_stub);

namespace {

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const FlexAttentionOptions& o) {
  FG_CHECK(q.defined() && k.defined() && v.defined(), ValueError, "flex_attention: q, k and v must be defined");
  FG_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, ShapeError,
           "flex_attention: expected q, k, v to be 4-D [B, H, L, E], got q {}, k {}, v {}", shape_str(q.sizes()),
           shape_str(k.sizes()), shape_str(v.sizes()));
  FG_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), DTypeError,
           "flex_attention: expected q, k, v to have the same dtype, got q {}, k {}, v {}", q.dtype(), k.dtype(), v.dtype());
  FG_CHECK(is_floating(q.dtype()), DTypeError, "flex_attention: expected floating point inputs, got {}", q.dtype());
  FG_CHECK(q.device() == k.device() && q.device() == v.device(), DeviceError,
           "flex_attention: expected q, k, v on the same device, got q {}, k {}, v {}", q.device(), k.device(), v.device());
  FG_CHECK(q.size(3) == k.size(3), ShapeError,
           "flex_attention: expected q and k to have the same head dim E, got q {} and k {}", shape_str(q.sizes()),
           shape_str(k.sizes()));
  FG_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2), ShapeError,
           "flex_attention: expected k and v to agree on [B, H, L], got k {} and v {}", shape_str(k.sizes()),
           shape_str(v.sizes()));
  FG_CHECK(q.size(0) == k.size(0) || k.size(0) == 1, ShapeError,
           "flex_attention: expected q and k/v batch sizes to match or k/v batch to be 1 (broadcast), got q {} and k {}",
           shape_str(q.sizes()), shape_str(k.sizes()));
  const int64_t Hq = q.size(1), Hkv = k.size(1);
  if (Hq != Hkv) {
    FG_CHECK(o.enable_gqa, ShapeError,
             "flex_attention: expect q and k/v to have the same number of heads but got Hq={} and Hkv={}; try setting "
             "enable_gqa=true for GQA", Hq, Hkv);
    FG_CHECK(Hkv > 0 && Hq % Hkv == 0, ShapeError,
             "flex_attention: expect number of query heads to be a multiple of kv heads for GQA but got Hq={} and Hkv={}",
             Hq, Hkv);
  }
  if (o.block_mask) {
    const BlockMask& bm = *o.block_mask;
    FG_CHECK(bm.defined(), ValueError,
             "flex_attention: block_mask is a default-constructed (empty) BlockMask; build one with create_block_mask");
    bm.check_unchanged("flex_attention");
    FG_CHECK(bm.seq_lengths().first == q.size(2) && bm.seq_lengths().second == k.size(2), ShapeError,
             "flex_attention: the BlockMask was created for (Q_LEN, KV_LEN) = ({}, {}) but got Q_LEN={} and KV_LEN={}; "
             "create the mask for these lengths or use BlockMask::adjust", bm.seq_lengths().first, bm.seq_lengths().second,
             q.size(2), k.size(2));
    FG_CHECK(bm.batch() == 1 || bm.batch() == q.size(0), ShapeError,
             "flex_attention: the BlockMask has batch size {} but q has batch size {} (expected 1 or equal)", bm.batch(),
             q.size(0));
    FG_CHECK(bm.heads() == 1 || bm.heads() == Hq, ShapeError,
             "flex_attention: the BlockMask has {} heads but q has {} heads (expected 1 or equal)", bm.heads(), Hq);
  }
}

BlockLists lists_of(const Tensor& num, const Tensor& idx, const Tensor& full_num, const Tensor& full_idx, Device dev) {
  BlockLists l;
  auto c = [dev](const Tensor& t) { return t.defined() ? t.to(kInt32).contiguous().to(dev) : t; };
  l.num = c(num);
  l.idx = c(idx);
  l.full_num = c(full_num);
  l.full_idx = c(full_idx);
  l.Bm = l.num.size(0);
  l.Hm = l.num.size(1);
  l.rows = l.num.size(2);
  return l;
}

// Every block of an (nR x nC) grid listed as full (no mask given). The lists depend on (rows, cols, device)
// only and kernels never write them, so they are built once and shared: a decode loop calls flex_attention
// with the same grid every step, and on a GPU each build is two host-to-device copies.
BlockLists all_full(int64_t rows, int64_t cols, Device dev) {
  static std::mutex mu;
  // Never destroyed: its tensors may live on a GPU, and at exit the CUDA backend can be gone before a static
  // map's destructor would free them (a crash at exit, seen on the H200).
  static auto* cache = new std::map<std::tuple<int64_t, int64_t, DeviceType, int>, BlockLists>();
  const auto key = std::make_tuple(rows, cols, dev.type, dev.index);
  std::lock_guard lock(mu);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  BlockLists l;
  l.rows = rows;
  l.full_num = full({1, 1, rows}, cols, kInt32).to(dev);
  l.full_idx = arange(0, static_cast<double>(cols), 1, kInt32).view({1, 1, 1, cols}).expand({1, 1, rows, cols}).contiguous().to(dev);
  if (cache->size() >= 64) cache->clear();  // bounded: grids of a few shapes recur, not thousands
  cache->emplace(key, l);
  return l;
}

// CUDA kernels read q/k/v in place when the last dim is contiguous and the pointer and other strides are
// 16-byte multiples (vector loads); anything else is copied to contiguous first.
Tensor kernel_layout(const Tensor& t) {
  const int64_t es = static_cast<int64_t>(element_size(t.dtype()));
  bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3 && ok; ++d) ok = t.size(d) == 1 || (t.stride(d) * es) % 16 == 0;
  return ok ? t : t.contiguous();
}

// The problem in kernel form (flex_kernels.h): on the CPU contiguous inputs, f64 and bf16 as given (the CPU
// kernels read bf16 themselves), others in f32; on CUDA the inputs as given where the kernels can read them in place. Block lists on q's device.
// derive_grad: a backward can follow: build the score_mod's derivative program (and, without a BlockMask,
// the transposed lists the backward walks).
FlexProblem make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const FlexAttentionOptions& o,
                         std::shared_ptr<const ModProgram> score_prog, bool derive_grad) {
  FlexProblem p;
  NoGradGuard no_grad;
  const Device dev = q.device();
  if (dev.type == DeviceType::CUDA) {
    p.q = kernel_layout(q.detach());
    p.k = kernel_layout(k.detach());
    p.v = kernel_layout(v.detach());
  } else {
    const DType cdt = q.dtype() == kFloat64 || q.dtype() == kBFloat16 ? q.dtype() : kFloat32;
    p.q = q.detach().to(cdt).contiguous();
    p.k = k.detach().to(cdt).contiguous();
    p.v = v.detach().to(cdt).contiguous();
  }
  p.deterministic = o.kernel.deterministic;
  p.cuda_forward = o.kernel.cuda_forward;
  p.cuda_backward = o.kernel.cuda_backward;
  p.approx_math = o.kernel.approx_math;
  p.max_scores_wanted = o.return_max_scores;
  FG_CHECK(o.kernel.kv_splits >= 0, ValueError, "flex_attention: kernel.kv_splits must be >= 0 (0: automatic), got {}",
           o.kernel.kv_splits);
  p.kv_splits = o.kernel.kv_splits;
  p.B = q.size(0); p.Hq = q.size(1); p.Lq = q.size(2); p.E = q.size(3);
  p.Bkv = k.size(0); p.Hkv = k.size(1); p.Lkv = k.size(2); p.Ev = v.size(3);
  p.scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(p.E));
  p.score_mod = std::move(score_prog);
  if (p.score_mod && derive_grad) p.score_grad = std::make_shared<ScoreModBackward>(derive_score_mod(*p.score_mod));
  if (o.block_mask) {
    const BlockMask& bm = *o.block_mask;
    p.block_q = bm.block_size().q;
    p.block_kv = bm.block_size().kv;
    p.mask_mod = bm.mask_program();
    p.kv_lists = lists_of(bm.kv_num_blocks(), bm.kv_indices(), bm.full_kv_num_blocks(), bm.full_kv_indices(), dev);
    p.q_lists = lists_of(bm.q_num_blocks(), bm.q_indices(), bm.full_q_num_blocks(), bm.full_q_indices(), dev);
    p.visited = bm.visited_blocks();
  } else {
    p.block_q = o.kernel.block_q > 0 ? o.kernel.block_q : 128;  // as create_block_mask's default
    p.block_kv = o.kernel.block_kv > 0 ? o.kernel.block_kv : 128;
    const int64_t nQB = (p.Lq + p.block_q - 1) / p.block_q, nKB = (p.Lkv + p.block_kv - 1) / p.block_kv;
    p.kv_lists = all_full(nQB, nKB, dev);
    if (derive_grad) p.q_lists = all_full(nKB, nQB, dev);  // the backward's lists; inference needs none
    p.visited = VisitedBlocks::of(nQB * nKB);
  }
  return p;
}

// What the fused backward reads besides its own outputs: q, k, v as given and every tensor the score_mod
// and the mask_mod capture, each with its storage version at forward time. As SavedTensor, an in-place
// change between forward and backward is an AutogradError raised before any kernel runs; without it the
// kernels would silently read the new values (a wrong dK after q.mul_(0), an exploding captured gradient
// after an optimizer step on a learnable bias).
class BackwardInputVersions {
 public:
  void save(std::string what, const Tensor& t) {
    if (t.defined()) entries_.push_back({std::move(what), t.detach(), t.version()});  // detach shares the storage
  }
  void save_captures(const char* mod, const ModProgram* program) {
    if (!program) return;
    for (const CaptureRef& c : program->captures()) save(fmt::format("the {} capture '{}'", mod, c.name), c.tensor);
  }
  void check() const {
    for (const Entry& e : entries_) {
      FG_CHECK(e.tensor.version() == e.version, AutogradError,
               "flex_attention backward: {}, one of the tensors needed for gradient computation, has been modified by "
               "an inplace operation: [{} tensor of shape {}] is at version {}; expected version {} instead",
               e.what, e.tensor.dtype(), shape_str(e.tensor.sizes()), e.tensor.version(), e.version);
    }
  }

 private:
  struct Entry {
    std::string what;
    Tensor tensor;
    uint32_t version;
  };
  std::vector<Entry> entries_;
};

// Records the fused kernels' backward node for a forward that left `out` and `lse` in the kernels' dtype and layout
// (the fused forward's, or cuDNN's forward under Auto's sliding-window rule), on r.out and r.lse when q, k, v or a
// learnable captured tensor need a gradient.
void record_fused_backward(std::shared_ptr<FlexProblem> prob, const Tensor& out, const Tensor& lse, const Tensor& q,
                           const Tensor& k, const Tensor& v, FlexAttentionResult& r) {
  // Inputs of the node: q, k, v, then the captured float tensors (learnable biases).
  TensorList inputs{q, k, v};
  std::vector<bool> needs_cap;
  if (prob->score_grad) {
    for (const CaptureRef& c : prob->score_grad->captures) {
      bool learn = is_floating(c.tensor.dtype()) && c.tensor.requires_grad();
      needs_cap.push_back(learn);
      inputs.push_back(learn ? c.tensor : Tensor());
    }
  }
  if (!needs_grad(inputs)) return;
  SavedTensor out_c = out, lse_c = lse;
  auto versions = std::make_shared<BackwardInputVersions>();
  versions->save("q", q);
  versions->save("k", k);
  versions->save("v", v);
  versions->save_captures("score_mod", prob->score_mod.get());
  versions->save_captures("mask_mod", prob->mask_mod.get());
  DType qdt = q.dtype(), kdt = k.dtype(), vdt = v.dtype();
  record("FlexAttentionBackward", inputs, {r.out, r.lse},
         [prob, out_c, lse_c, versions, needs_cap, qdt, kdt, vdt](const TensorList& g) {
           versions->check();
           const DType cdt = prob->q.dtype();
           const TensorOptions kernel_opts = TensorOptions().dtype(cdt).device(prob->q.device());
           Tensor dout = g[0].defined() ? g[0].to(cdt).contiguous() : zeros(out_c.unpack().sizes(), kernel_opts);
           const DType stat_dt = cdt == kFloat64 ? kFloat64 : kFloat32;
           Tensor dlse = g.size() > 1 && g[1].defined() ? g[1].to(stat_dt).contiguous() : Tensor();
           FlexBackwardOutputs b;
           b.dq = empty(prob->q.sizes(), kernel_opts);
           b.dk = empty(prob->k.sizes(), kernel_opts);
           b.dv = empty(prob->v.sizes(), kernel_opts);
           if (prob->has_rows()) {
             flex_backward_stub(prob->q.device(), *prob, out_c.unpack(), lse_c.unpack(), dout, dlse, needs_cap, b);
           } else {  // no query rows: nothing flows back
             b.dk.zero_();
             b.dv.zero_();
             for (size_t c = 0; c < needs_cap.size(); ++c) {
               const Tensor& cap = prob->score_grad->captures[c].tensor;
               b.dcaps.push_back(needs_cap[c] ? zeros(cap.sizes(), kFloat64) : Tensor());
             }
           }
           TensorList grads{b.dq.to(qdt), b.dk.to(kdt), b.dv.to(vdt)};
           for (size_t c = 0; c < needs_cap.size(); ++c) {
             const Tensor& cap = prob->score_grad->captures[c].tensor;
             grads.push_back(needs_cap[c] ? b.dcaps[c].to(cap.dtype()).to(cap.device()) : Tensor());
           }
           return grads;
         });
}

// The fused problem of a call: the score_mod traced and, when a gradient may follow, its derivative derived.
// `traced`: the score_mod's program where the caller traced it already.
std::shared_ptr<FlexProblem> fused_problem(const Tensor& q, const Tensor& k, const Tensor& v,
                                           const FlexAttentionOptions& o,
                                           std::shared_ptr<const ModProgram> traced = nullptr) {
  std::shared_ptr<const ModProgram> score_prog = std::move(traced);
  if (o.score_mod && !score_prog) score_prog = std::make_shared<ModProgram>(trace_score_mod(o.score_mod));
  // Inference (no grad mode, nothing requiring grad) skips deriving the backward program.
  TensorList grad_inputs{q, k, v};
  if (score_prog) {
    for (const CaptureRef& c : score_prog->captures()) grad_inputs.push_back(c.tensor);
  }
  return std::make_shared<FlexProblem>(make_problem(q, k, v, o, score_prog, needs_grad(grad_inputs)));
}

FlexAttentionResult fused(const Tensor& q, const Tensor& k, const Tensor& v, const FlexAttentionOptions& o) {
  std::shared_ptr<FlexProblem> prob = fused_problem(q, k, v, o);
  const DType cdt = prob->q.dtype();                            // the kernels' input/output dtype
  const DType stat_dt = cdt == kFloat64 ? kFloat64 : kFloat32;  // lse and max_scores
  FlexForwardOutputs f;
  f.out = empty({prob->B, prob->Hq, prob->Lq, prob->Ev}, TensorOptions().dtype(cdt).device(q.device()));
  f.lse = empty({prob->B, prob->Hq, prob->Lq}, TensorOptions().dtype(stat_dt).device(q.device()));
  f.max_scores = empty({prob->B, prob->Hq, prob->Lq}, TensorOptions().dtype(stat_dt).device(q.device()));
  // No query rows (B, H or L_q = 0): empty results, as PyTorch, without launching kernels over nothing.
  if (prob->has_rows()) flex_forward_stub(q.device(), *prob, f);

  FlexAttentionResult r;
  {
    NoGradGuard g;
    r.out = f.out.to(q.dtype());
    r.lse = q.dtype() == kFloat64 ? f.lse : f.lse.to(kFloat32);
    r.max_scores = q.dtype() == kFloat64 ? f.max_scores : f.max_scores.to(kFloat32);
  }
  record_fused_backward(prob, f.out, f.lse, q, k, v, r);
  return r;
}

// ---- FlexBackend::Cudnn: cuDNN's fused SDPA for the calls lower_to_cudnn accepts.

// The captured bias as cuDNN reads it: [Bb, Hb, Lq, Lkv] contiguous in `dt` (Bb = B when the bias reads b, else
// 1; likewise Hb), broadcast over the q or kv it does not read.
Tensor cudnn_bias(const Tensor& cap, const CudnnSdpaSpec& s, const int64_t extent[4], DType dt) {
  Tensor c = cap.detach();
  Shape sizes(4), strides(4);
  int64_t offset = c.storage_offset();
  for (int r = 0; r < 4; ++r) {
    const int d = s.bias_dim[r];
    sizes[r] = d >= 0 || r >= 2 ? extent[r] : 1;
    strides[r] = d >= 0 ? c.stride(d) : 0;
  }
  return c.as_strided(sizes, strides, offset).to(dt).contiguous();
}

// dBias [Bb, Hb, Lq, Lkv] back to the capture's shape: summed over the q / kv it broadcast, zero past the
// entries the call read.
Tensor cudnn_bias_grad(const Tensor& dbias, const Tensor& cap, const CudnnSdpaSpec& s) {
  Tensor g = dbias.to(kFloat32);
  Shape keep;
  for (int r = 3; r >= 2; --r) {
    if (s.bias_dim[r] < 0) g = sum(g, Shape{r}, true);
  }
  for (int r = 0; r < 4; ++r) if (s.bias_dim[r] >= 0) keep.push_back(g.size(r));
  g = g.contiguous().view(keep);
  Tensor full = zeros(cap.sizes(), TensorOptions().dtype(kFloat32).device(cap.device()));
  Tensor region = full;
  for (int64_t d = 0; d < static_cast<int64_t>(keep.size()); ++d) region = region.narrow(d, 0, keep[d]);
  region.copy_(g);
  return full;
}

// A program's own ALiBi slopes on the device, built once per (slopes, device): a loop calls with the same mod.
Tensor constant_slopes(const std::vector<double>& slopes, Device dev) {
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<std::vector<double>, std::pair<int, int>>, Tensor>();  // never destroyed
  const auto key = std::make_pair(slopes, std::make_pair(static_cast<int>(dev.type), static_cast<int>(dev.index)));
  std::lock_guard lock(mu);
  if (auto it = cache->find(key); it != cache->end()) return it->second;
  Tensor t = from_vector<double>(slopes, {static_cast<int64_t>(slopes.size())}, kFloat32).to(dev);
  if (cache->size() >= 64) cache->clear();
  cache->emplace(key, t);
  return t;
}

// A call lowered for cuDNN with its tensors as the graphs read them (cudnn_prepare), run by cudnn_run.
struct CudnnCall {
  std::shared_ptr<const ModProgram> prog;
  std::shared_ptr<CudnnSdpaSpec> spec;
  std::shared_ptr<CudnnSdpaTensors> t;
  Tensor bias_cap;  // the captured bias tensor (Bias::Tensor)
  bool learn_bias = false;
  // The forward on cuDNN, the backward on the fused kernels, from cuDNN's output and lse (auto_cudnn_call's
  // sliding-window rule).
  bool backward_fused = false;
};

// Lowers the call and prepares its tensors; nullopt with `declined` (the lowering's reason) when it does not lower.
// A bias captured on another device than q raises DeviceError when `forced`, else declines too.
std::optional<CudnnCall> cudnn_prepare(const Tensor& q, const Tensor& k, const Tensor& v, const FlexAttentionOptions& o,
                                       bool forced, std::string& declined) {
  std::shared_ptr<const ModProgram> prog;
  if (o.score_mod) prog = std::make_shared<ModProgram>(trace_score_mod(o.score_mod));
  CudnnLoweringInput in;
  in.score_mod = prog.get();
  in.block_mask = o.block_mask ? &*o.block_mask : nullptr;
  in.B = q.size(0); in.Hq = q.size(1); in.Lq = q.size(2); in.E = q.size(3);
  in.Bkv = k.size(0); in.Hkv = k.size(1); in.Lkv = k.size(2); in.Ev = v.size(3);
  in.dtype = q.dtype();
  CudnnLowering low = lower_to_cudnn(in);
  if (!low.lowers()) {
    declined = low.declined;
    return std::nullopt;
  }
  auto spec = std::make_shared<CudnnSdpaSpec>(*low.spec);
  auto t = std::make_shared<CudnnSdpaTensors>();
  Tensor bias_cap;
  {
    NoGradGuard g;
    t->q = kernel_layout(q.detach());
    t->k = kernel_layout(k.detach());
    t->v = kernel_layout(v.detach());
    t->scale = (o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(in.E))) * spec->score_scale;
    const TensorOptions io = TensorOptions().dtype(q.dtype()).device(q.device());
    t->out = empty({in.B, in.Hq, in.Lq, in.Ev}, io);
    t->stats = empty({in.B, in.Hq, in.Lq}, TensorOptions().dtype(kFloat32).device(q.device()));
    const int64_t extent[4] = {in.B, in.Hq, in.Lq, in.Lkv};
    if (spec->bias == CudnnSdpaSpec::Bias::Tensor) {
      bias_cap = prog->captures()[spec->bias_capture].tensor;
      if (bias_cap.device() != q.device()) {
        FG_CHECK(!forced, DeviceError, "flex_attention: the score_mod's bias '{}' is on {} but q is on {}",
                 prog->captures()[spec->bias_capture].name, bias_cap.device(), q.device());
        declined = fmt::format("the score_mod's bias is on {}, q on {}", bias_cap.device(), q.device());
        return std::nullopt;
      }
      t->bias = cudnn_bias(bias_cap, *spec, extent, q.dtype());
    } else if (spec->bias == CudnnSdpaSpec::Bias::Alibi) {
      t->slopes = spec->alibi_capture >= 0
                      ? prog->captures()[spec->alibi_capture].tensor.detach().narrow(0, 0, in.Hq).to(q.device(), kFloat32).contiguous()
                      : constant_slopes(spec->alibi_slopes, q.device());
    }
  }
  return CudnnCall{prog, spec, t, bias_cap, spec->bias_learnable && bias_cap.defined()};
}

FlexAttentionResult cudnn_run(const CudnnCall& call, const Tensor& q, const Tensor& k, const Tensor& v,
                              const FlexAttentionOptions& o) {
  const std::shared_ptr<const ModProgram> prog = call.prog;
  const std::shared_ptr<CudnnSdpaSpec> spec = call.spec;
  const std::shared_ptr<CudnnSdpaTensors> t = call.t;
  const Tensor bias_cap = call.bias_cap;
  const bool learn_bias = call.learn_bias;
  const int64_t B = t->q.size(0), Hq = t->q.size(1), Lq = t->q.size(2);
  if (B > 0 && Hq > 0 && Lq > 0) cudnn_sdpa_forward_stub(q.device(), *spec, *t);
  FlexAttentionResult r;
  r.out = t->out;
  r.lse = t->stats;
  if (call.backward_fused) {
    record_fused_backward(fused_problem(q, k, v, o, prog), t->out, t->stats, q, k, v, r);
    return r;
  }
  TensorList inputs{q, k, v};
  if (learn_bias) inputs.push_back(bias_cap);
  if (needs_grad(inputs)) {
    auto versions = std::make_shared<BackwardInputVersions>();
    versions->save("q", q);
    versions->save("k", k);
    versions->save("v", v);
    versions->save_captures("score_mod", prog.get());
    if (o.block_mask) versions->save_captures("mask_mod", o.block_mask->mask_program().get());
    versions->save("the output", t->out);  // cuDNN's backward reads O and the stats as the forward left them
    versions->save("the lse", t->stats);
    const DType qdt = q.dtype();
    const bool deterministic = o.kernel.deterministic;
    record("FlexAttentionCudnnBackward", inputs, {r.out, r.lse},
           [spec, t, versions, learn_bias, bias_cap, qdt, deterministic](const TensorList& g) {
             versions->check();
             FG_CHECK(!(g.size() > 1 && g[1].defined()), NotImplementedError,
                      "flex_attention (cuDNN backend): no gradient through the returned lse (cuDNN's backward graph takes "
                      "dO only); use FlexBackend::Fused");
             const TensorOptions io = TensorOptions().dtype(qdt).device(t->q.device());
             CudnnSdpaGrads gr;
             gr.deterministic = deterministic;
             gr.dout = g[0].defined() ? g[0].to(qdt).contiguous() : zeros(t->out.sizes(), io);
             gr.dq = empty(t->q.sizes(), io);
             gr.dk = empty(t->k.sizes(), io);
             gr.dv = empty(t->v.sizes(), io);
             if (learn_bias) gr.dbias = empty(t->bias.sizes(), io);
             if (t->q.size(0) > 0 && t->q.size(1) > 0 && t->q.size(2) > 0) {
               cudnn_sdpa_backward_stub(t->q.device(), *spec, *t, gr);
             } else {
               gr.dk.zero_();
               gr.dv.zero_();
               if (learn_bias) gr.dbias.zero_();
             }
             TensorList grads{gr.dq, gr.dk, gr.dv};
             if (learn_bias) grads.push_back(cudnn_bias_grad(gr.dbias, bias_cap, *spec).to(bias_cap.dtype()));
             return grads;
           });
  }
  return r;
}

// kernel.backend = FlexBackend::Cudnn: raises (NotImplementedError with the reason) where cuDNN cannot run the call.
FlexAttentionResult cudnn_path(const Tensor& q, const Tensor& k, const Tensor& v, const FlexAttentionOptions& o) {
  FG_CHECK(q.device().type == DeviceType::CUDA, NotImplementedError,
           "flex_attention: kernel.backend = FlexBackend::Cudnn runs on CUDA devices, got {}", q.device());
  FG_CHECK(cudnn_sdpa_forward_stub.has(DeviceType::CUDA), NotImplementedError,
           "flex_attention: kernel.backend = FlexBackend::Cudnn, but this build of flexgrad has no cuDNN (CMake found "
           "no cudnn_graph.h beside the CUDA toolkit)");
  FG_CHECK(!o.return_max_scores, NotImplementedError,
           "flex_attention: kernel.backend = FlexBackend::Cudnn gives no max_scores (cuDNN's graph returns the lse only)");
  const std::string why = cudnn_available_stub(q.device(), q.device());
  FG_CHECK(why.empty(), NotImplementedError, "flex_attention: kernel.backend = FlexBackend::Cudnn: {}", why);
  std::string declined;
  std::optional<CudnnCall> call = cudnn_prepare(q, k, v, o, /*forced=*/true, declined);
  FG_CHECK(call.has_value(), NotImplementedError, "flex_attention: kernel.backend = FlexBackend::Cudnn cannot run this "
           "call: {}", declined);
  return cudnn_run(*call, q, k, v, o);
}

// FLEXGRAD_FLEX_CUDNN: unset or empty -1 (the rule), 0 (Auto never picks cuDNN), 1 (wherever it runs, any arch).
int flex_cudnn_env() {
  const char* env = std::getenv("FLEXGRAD_FLEX_CUDNN");
  const std::string v = env == nullptr ? "" : env;
  FG_CHECK(v.empty() || v == "0" || v == "1", ValueError, "FLEXGRAD_FLEX_CUDNN: expected 0 or 1; got \"{}\"", v);
  return v.empty() ? -1 : v == "1";
}

// The one place Auto chooses cuDNN over our fused kernels: the call, prepared, when Auto runs it on cuDNN.
//
// The rule, measured on the H200 (sm_90a, cuDNN 9.19; bf16 B4 H16 S4096 D128, TFLOP/s forward / backward, session
// 8): cuDNN's fused SDPA vs our wgmma kernels: no mask 632/542 vs 306/251, causal 579/462 vs 270/204, sliding
// window 1024 463/374 vs 235/185, ALiBi + causal 475/442 vs 160/141, causal D64 B8 407/362 vs 202/146: about 2x
// wherever a program lowers (the backward figures are the nondeterministic dQ-accumulator graph's). Session 9, same
// call as PyTorch, deterministic backward: no mask 654/490, causal 579/419, ALiBi 485/414, softcap + causal through
// the pointwise score-modifier graph 436/388 against our 120/97; the sliding window's deterministic backward (202) is
// the one row near ours (189). So Auto takes cuDNN when all hold:
//   - a CUDA device whose NVRTC target is sm_90a (measured there only; other GPUs keep our kernels), cuDNN in the
//     build and loadable, bf16 / f16 (the lowering's own rule);
//   - the call lowers (lower_to_cudnn) and cuDNN builds its forward plan and, when a gradient is needed, its
//     backward plan (deterministic engines when kernel.deterministic; asked here, at forward time, and cached);
//   - nothing only the fused kernels give: no return_max_scores, no return_lse while a gradient is needed (cuDNN's
//     backward takes no gradient through the lse), no explicit cuda_forward / cuda_backward / kv_splits;
//   - at least 128 query rows (decoding shapes keep the split-KV kernel: cuDNN was not measured there).
// A sliding window with a deterministic gradient and no score_mod but a scale splits the call: cuDNN's forward, our
// backward (measured below, CudnnCall::backward_fused).
// Otherwise our kernels run: a choice, not a fallback (both compute the same attention). FLEXGRAD_FLEX_CUDNN=0 keeps
// Auto off cuDNN; =1 takes it wherever the call lowers and cuDNN can run it, on any GPU and any query length.
std::optional<CudnnCall> auto_cudnn_call(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const FlexAttentionOptions& o) {
  if (q.device().type != DeviceType::CUDA || !cudnn_sdpa_forward_stub.has(DeviceType::CUDA)) return std::nullopt;
  const int env = flex_cudnn_env();
  if (env == 0) return std::nullopt;
  if (q.dtype() != kBFloat16 && q.dtype() != kFloat16) return std::nullopt;
  if (o.return_max_scores) return std::nullopt;
  if (o.kernel.cuda_forward != FlexCudaForward::Auto || o.kernel.cuda_backward != FlexCudaBackward::Auto ||
      o.kernel.kv_splits != 0) {
    return std::nullopt;
  }
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) return std::nullopt;
  if (env == -1 && (q.size(2) < 128 || cudnn_device_arch_stub(q.device(), q.device()) != "sm_90a")) return std::nullopt;
  if (!cudnn_available_stub(q.device(), q.device()).empty()) return std::nullopt;
  std::string declined;
  std::optional<CudnnCall> call = cudnn_prepare(q, k, v, o, /*forced=*/false, declined);
  if (!call) return std::nullopt;
  TensorList inputs{q, k, v};
  if (call->learn_bias) inputs.push_back(call->bias_cap);
  const bool grad = needs_grad(inputs);
  if (grad && o.return_lse) return std::nullopt;
  // A sliding window (a left bound) with a deterministic backward and no score_mod but a scale: cuDNN's forward,
  // our backward (session 21, H200, bf16 B4 H16 S4096 D128, window 1024: cuDNN's deterministic backward 202
  // TFLOP/s, ours 257; its forward 463 against ours 334). Windows with a bias or a pointwise score_mod were not
  // measured: they keep cuDNN's backward. Every row keeps its diagonal (the lowering admits a left bound only with
  // Lq <= Lkv and a right bound >= 0), so cuDNN's lse is finite where our backward reads it.
  const CudnnSdpaSpec& spec = *call->spec;
  call->backward_fused = grad && o.kernel.deterministic && spec.left_bound.has_value() &&
                         spec.right_bound.value_or(0) >= 0 && spec.bias == CudnnSdpaSpec::Bias::None &&
                         !spec.pointwise;
  const std::string why = cudnn_plan_check_stub(q.device(), *call->spec, *call->t, grad && !call->backward_fused,
                                                call->learn_bias, o.kernel.deterministic);
  if (!why.empty()) return std::nullopt;
  return call;
}

}  // namespace

FlexAttentionResult flex_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                   const FlexAttentionOptions& o) {
  // Under an AutocastGuard (ops/autocast.h) float32 inputs run in its half dtype, as PyTorch's autocast does.
  const Tensor q = autocast_operand(q_in), k = autocast_operand(k_in), v = autocast_operand(v_in);
  check_inputs(q, k, v, o);
  // Auto is cuDNN where auto_cudnn_call's rule says so, else the fused kernel of the inputs' device; the reference
  // path runs only when asked for.
  std::optional<CudnnCall> auto_cudnn;
  if (o.kernel.backend == FlexBackend::Auto) auto_cudnn = auto_cudnn_call(q, k, v, o);
  FlexBackend backend = o.kernel.backend == FlexBackend::Auto ? FlexBackend::Fused : o.kernel.backend;
  if (auto_cudnn) backend = FlexBackend::Cudnn;
  if (backend == FlexBackend::Fused) {
    FG_CHECK(flex_forward_stub.has(q.device().type), NotImplementedError,
             "flex_attention: no fused kernel for device {} in this build (flexgrad built without CUDA?); pass "
             "kernel.backend = FlexBackend::Reference to run the unfused reference path", q.device());
  }
  FlexAttentionResult r;
  if (backend == FlexBackend::Reference) {
    std::optional<ModProgram> prog;
    if (o.score_mod) prog = trace_score_mod(o.score_mod);
    FlexReferenceInputs in{q, k, v, o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(q.size(3))),
                           prog ? &*prog : nullptr, o.block_mask ? &*o.block_mask : nullptr};
    r = flex_attention_reference(in);
    if (q.dtype() != kFloat64) {
      r.lse = r.lse.to(kFloat32);
      r.max_scores = r.max_scores.to(kFloat32);
    }
  } else if (auto_cudnn) {
    r = cudnn_run(*auto_cudnn, q, k, v, o);
  } else if (backend == FlexBackend::Cudnn) {
    r = cudnn_path(q, k, v, o);
  } else {
    r = fused(q, k, v, o);
  }
  if (!o.return_lse) r.lse = Tensor();
  if (!o.return_max_scores) r.max_scores = Tensor();
  return r;
}

}  // namespace fg
