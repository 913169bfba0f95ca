// Fused FlexAttention on the CPU.
//
// Forward, per (b, h, q block), in parallel: for each kv block the BlockMask lists, S = scale * Q K^T,
// score_mod over the tile (TileEvaluator), the mask on partial blocks only, then an online softmax
// update of the running max, sum and P @ V. float32 tiles run the register-blocked kernels of the
// running CPU's instruction set (tile_kernels.h; each thread transposes the K and V head it works on,
// so that every tile product reads its B operand row by row); float64 runs OpenBLAS (accuracy first:
// gradchecks). The L x L score matrix never exists; memory is O(B * H * L * E) plus a few tiles and
// one transposed head per thread.
//
// Backward recomputes the tiles from the saved LSE, deterministically (no atomics, no race-dependent
// sums). With at least two (kv batch, kv head) pairs per thread, one pass per pair: its kv blocks in
// turn, each over the q blocks the transposed BlockMask lists for the q heads of its GQA group and the
// batches broadcast onto it, adding into dK, dV and those heads' dQ (one writer each). Otherwise two
// passes with more, smaller tasks: dK/dV per (kv batch, kv head, kv block) as above, then dQ and the
// captured-tensor gradients per (b, h, q block). Captured gradients accumulate per thread in double
// and are summed in thread order.
// Built without trapping math (as tile_eval.cpp) so the loops below vectorise; flexgrad never reads
// floating-point exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <mutex>
#include <optional>

#include "flexgrad/attention/cpu/thread_scratch.h"
#include "flexgrad/attention/cpu/tile_kernels.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/attention/kv_band.h"
#include "flexgrad/attention/tile_eval.h"
#include "flexgrad/ops/cpu/blas_threads.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/half.h"


namespace fg::cpu {
namespace {

// C[m x n] = alpha * op(A) op(B) + beta * C, row-major (float64 problems).
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                 const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda,
              b, ldb, beta, c, ldc);
}

// The products and row passes of a tile. float: the tile kernels of this CPU, with B^T given for the
// A B^T products (the transposed K or V); double: OpenBLAS and plain loops.
template <class T> struct TileMath;
template <> struct TileMath<float> {
  const TileKernels& tk = tile_kernels();
  // C = alpha A B^T: B is n x k (ldb), bt its transpose k x n (ldbt).
  void nt(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float*, int64_t,
          const float* bt, int64_t ldbt, float* c, int64_t ldc) const {
    tk.gemm(false, m, n, k, alpha, a, lda, bt, ldbt, false, c, ldc);
  }
  // C (+)= alpha op(A) B
  void nn(bool a_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, bool accumulate, float* c, int64_t ldc) const {
    tk.gemm(a_trans, m, n, k, alpha, a, lda, b, ldb, accumulate, c, ldc);
  }
  float row_max(const float* x, int64_t n) const { return tk.row_max(x, n); }
  float exp_sum(float* x, int64_t n, float m) const { return tk.exp_sum(x, n, m); }
  float exp_sum_max(float* x, int64_t n, float m) const { return tk.exp_sum_max(x, n, m); }
  void softmax_grad(float* dp, const float* p, int64_t n, float d) const { tk.softmax_grad(dp, p, n, d); }
};
template <> struct TileMath<double> {
  void nt(int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b, int64_t ldb,
          const double*, int64_t, double* c, int64_t ldc) const {
    gemm(false, true, m, n, k, alpha, a, lda, b, ldb, 0.0, c, ldc);
  }
  void nn(bool a_trans, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda, const double* b,
          int64_t ldb, bool accumulate, double* c, int64_t ldc) const {
    gemm(a_trans, false, m, n, k, alpha, a, lda, b, ldb, accumulate ? 1.0 : 0.0, c, ldc);
  }
  double row_max(const double* x, int64_t n) const {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;  // skips NaN
    return m;
  }
  double exp_sum(double* x, int64_t n, double m) const {
    double s = 0;
    for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
    return s;
  }
  double exp_sum_max(double* x, int64_t n, double m) const { return exp_sum(x, n, m); }
  void softmax_grad(double* dp, const double* p, int64_t n, double d) const {
    for (int64_t j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - d);
  }
};

// Collects the first exception thrown inside a parallel region, to rethrow outside it.
struct ErrorSlot {
  std::mutex mu;
  std::exception_ptr first;
  void capture() {
    std::lock_guard l(mu);
    if (!first) first = std::current_exception();
  }
  void rethrow() {
    if (first) std::rethrow_exception(first);
  }
};

// The blocks of one row of a BlockLists: partial ones first, then full ones.
struct RowBlocks {
  const int32_t* partial = nullptr;
  int64_t n_partial = 0;
  const int32_t* full = nullptr;
  int64_t n_full = 0;
  int64_t size() const { return n_partial + n_full; }
  int32_t at(int64_t i) const { return i < n_partial ? partial[i] : full[i - n_partial]; }
  bool is_partial(int64_t i) const { return i < n_partial; }
};

// Rows and columns of the largest tile: a block, or the sequence when it is shorter (a 16-token call does
// not allocate, and fault in, 128 x 128 scratch tiles).
int64_t tile_rows(const FlexProblem& p) { return std::min(p.block_q, p.Lq); }
int64_t tile_cols(const FlexProblem& p) { return std::min(p.block_kv, p.Lkv); }

RowBlocks row_blocks(const BlockLists& l, int64_t b, int64_t h, int64_t row) {
  int64_t bm = l.Bm == 1 ? 0 : b, hm = l.Hm == 1 ? 0 : h;
  int64_t r = (bm * l.Hm + hm) * l.rows + row;
  RowBlocks rb;
  if (l.num.defined()) {
    int64_t cols = l.idx.sizes()[3];
    rb.n_partial = l.num.data<int32_t>()[r];
    rb.partial = l.idx.data<int32_t>() + r * cols;
  }
  if (l.full_num.defined()) {
    int64_t cols = l.full_idx.sizes()[3];
    rb.n_full = l.full_num.data<int32_t>()[r];
    rb.full = l.full_idx.data<int32_t>() + r * cols;
  }
  return rb;
}

// Element (i, j) of a tile value as T.
template <class T> T tile_at(const TileValue& v, int64_t i, int64_t j) {
  const int64_t o = i * v.row_stride + j * v.col_stride;
  switch (v.kind) {
    case ValueKind::Float: return v.as<T>()[o];
    case ValueKind::Int: return static_cast<T>(v.as<int64_t>()[o]);
    default: return static_cast<T>(v.as<uint8_t>()[o]);
  }
}

// A score_mod of the softcap form outer * tanh(score / inner) or outer * tanh(score * inner) (constants in
// either operand order), which the float tiles run as one kernel pass (TileKernels::softcap) instead of
// interpreting it.
struct SoftcapForm {
  bool divide = true;
  float inner = 1, outer = 1;
};
std::optional<SoftcapForm> softcap_form(const ModProgram* prog) {
  if (!prog || prog->outputs().size() != 1) return std::nullopt;
  const std::vector<Instr>& in = prog->instrs();
  auto is = [&](int32_t id, ExprOp op) { return in[id].op == op && in[id].kind == ValueKind::Float; };
  // (constant, other operand) of a float binary instruction with one constant operand
  auto const_operand = [&](int32_t id) -> std::optional<std::pair<double, int32_t>> {
    const Instr& x = in[id];
    if (x.args.size() != 2) return std::nullopt;
    if (is(x.args[0], ExprOp::Const)) return std::pair{in[x.args[0]].value, x.args[1]};
    if (is(x.args[1], ExprOp::Const)) return std::pair{in[x.args[1]].value, x.args[0]};
    return std::nullopt;
  };
  const int32_t out = prog->output();
  if (!is(out, ExprOp::Mul)) return std::nullopt;
  const auto o = const_operand(out);
  if (!o || !is(o->second, ExprOp::Tanh)) return std::nullopt;
  const int32_t arg = in[o->second].args[0];
  SoftcapForm f;
  f.outer = static_cast<float>(o->first);
  if (is(arg, ExprOp::Div) && is(in[arg].args[0], ExprOp::Score) && is(in[arg].args[1], ExprOp::Const)) {
    f.inner = static_cast<float>(in[in[arg].args[1]].value);
  } else if (is(arg, ExprOp::Mul)) {
    const auto i = const_operand(arg);
    if (!i || !is(i->second, ExprOp::Score)) return std::nullopt;
    f.divide = false;
    f.inner = static_cast<float>(i->first);
  } else {
    return std::nullopt;
  }
  return f;
}

// A score_mod of the ALiBi form score + c * (kv_idx - q_idx) (or q_idx - kv_idx; operands in either order),
// c depending on the batch and head only: one pass over the float tile instead of the interpreter's four
// (the int difference, its cast, the product, the sum). `sign` is +1 for kv_idx - q_idx.
struct DistanceBiasForm {
  float sign = 1;
};
std::optional<DistanceBiasForm> distance_bias_form(const ModProgram* prog) {
  if (!prog || prog->outputs().size() != 1) return std::nullopt;
  const std::vector<Instr>& in = prog->instrs();
  auto is = [&](int32_t id, ExprOp op, ValueKind k) { return in[id].op == op && in[id].kind == k; };
  const int32_t out = prog->output();
  if (!is(out, ExprOp::Add, ValueKind::Float) || in[out].args.size() != 2) return std::nullopt;
  int32_t bias = in[out].args[1];
  if (!is(in[out].args[0], ExprOp::Score, ValueKind::Float)) {
    if (!is(bias, ExprOp::Score, ValueKind::Float)) return std::nullopt;
    bias = in[out].args[0];
  }
  if (!is(bias, ExprOp::Mul, ValueKind::Float) || in[bias].args.size() != 2) return std::nullopt;
  for (int side = 0; side < 2; ++side) {
    const int32_t d = in[bias].args[side], c = in[bias].args[1 - side];
    if ((in[c].deps & (kUsesScore | kUsesQ | kUsesKV)) != 0) continue;  // c: batch and head only
    if (!is(d, ExprOp::Cast, ValueKind::Float) || !is(in[d].args[0], ExprOp::Sub, ValueKind::Int)) continue;
    const std::vector<int32_t>& ab = in[in[d].args[0]].args;
    if (is(ab[0], ExprOp::KVIdx, ValueKind::Int) && is(ab[1], ExprOp::QIdx, ValueKind::Int)) return DistanceBiasForm{1};
    if (is(ab[0], ExprOp::QIdx, ValueKind::Int) && is(ab[1], ExprOp::KVIdx, ValueKind::Int)) return DistanceBiasForm{-1};
  }
  return std::nullopt;
}

// out = pre + c * float(sign * (kv - q)) over a tile, rounded as the interpreter does: the product and the
// sum each rounded (no fused multiply-add), the distance exact in float (|kv - q| < 2^24).
__attribute__((optimize("fp-contract=off"))) void add_distance_bias(const float* pre, float* out, int64_t nq,
                                                                     int64_t nkv, int64_t ld, int64_t q0, int64_t kv0,
                                                                     float sign, float c) {
  for (int64_t i = 0; i < nq; ++i) {
    const int32_t d0 = static_cast<int32_t>(kv0 - (q0 + i));
    const float* x = pre + i * ld;
    float* y = out + i * ld;
    for (int32_t j = 0; j < static_cast<int32_t>(nkv); ++j) y[j] = x[j] + c * (sign * static_cast<float>(d0 + j));
  }
}

// One tile of modified, masked scores for (b, h) over q rows [q0, q0+nq) and kv cols [kv0, kv0+nkv).
// `pre` receives scale * Q K^T (needed by the backward's derivative), `s` the modified, masked scores.
// krows: K's rows kv0.. of the head; kt: the block's K^T (HeadPack, E x nkv, leading dimension nkv; float
// only).
template <class T>
struct TileScorer {
  const FlexProblem& p;
  TileMath<T> math;
  // float: a softcap score_mod runs as a tile kernel, not through score_ev
  std::optional<SoftcapForm> softcap = std::is_same_v<T, float> ? softcap_form(p.score_mod.get()) : std::nullopt;
  // float, sequences under 2^24: an ALiBi-form score_mod runs as one pass; score_ev gives its c per (b, h)
  std::optional<DistanceBiasForm> distance =
      std::is_same_v<T, float> && std::max(p.Lq, p.Lkv) < (int64_t{1} << 24) ? distance_bias_form(p.score_mod.get())
                                                                            : std::nullopt;
  // a mask_mod keeping one kv interval per row (causal, sliding window, band: attention/kv_band.h) masks a
  // partial tile with two integers per row instead of the interpreter
  std::optional<KvBand> band = kv_band(p.mask_mod.get());
  ThreadEvaluator<T> score_ev, mask_ev;
  ScratchTile<uint8_t> mask;
  explicit TileScorer(const FlexProblem& prob)
      : p(prob),
        score_ev(kScoreEval, softcap ? nullptr : prob.score_mod.get()),
        mask_ev(kMaskEval, band ? nullptr : prob.mask_mod.get()),
        mask(kMaskTile, band ? 0 : tile_rows(prob) * tile_cols(prob)) {
  }
  void compute(int64_t b, int64_t h, const T* qrows, int64_t q0, int64_t nq, const T* krows, const T* kt, int64_t kv0,
               int64_t nkv, bool partial, T* pre, T* s, int64_t ld, T* dscore = nullptr) {
    math.nt(nq, nkv, p.E, static_cast<T>(p.scale), qrows, p.E, krows, p.E, kt, nkv, pre, ld);
    mods(b, h, q0, nq, kv0, nkv, partial, pre, s, ld, dscore);
  }
  // The score_mod and, on partial blocks, the mask over pre = scale * Q K^T. dscore (the backward's, softcap
  // only): also receives d score_mod / d score at pre, from the same tanh.
  void mods(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, bool partial, T* pre, T* s,
            int64_t ld, T* dscore = nullptr) {
    // The evaluators run over strips of ~2048 scores: every instruction is a pass over its buffer, and a
    // strip's buffers (a few of 8 KB to 16 KB) stay in L1 where a whole tile's (64 KB to 128 KB each) do not.
    const int64_t strip = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, nkv));
    if (softcap) {
      if constexpr (std::is_same_v<T, float>) {  // (always empty for double)
        for (int64_t i = 0; i < nq; ++i) {
          if (dscore) {
            math.tk.softcap_grad(pre + i * ld, nkv, softcap->inner, softcap->divide, softcap->outer, s + i * ld,
                                 dscore + i * ld);
          } else {
            math.tk.softcap(pre + i * ld, nkv, softcap->inner, softcap->divide, softcap->outer, s + i * ld);
          }
        }
      }
    } else if (distance) {
      if constexpr (std::is_same_v<T, float>) {  // (always empty for double)
        // c is the program's value at q = 0, kv = 1, score = 0 (0 + c * 1), as the interpreter rounds it
        const float zero = 0;
        score_ev->run(b, h, 0, 1, 1, 1, &zero, 1);
        const float c = tile_at<float>(score_ev->output(0), 0, 0) * distance->sign;
        add_distance_bias(pre, s, nq, nkv, ld, q0, kv0, distance->sign, c);
      }
    } else if (score_ev) {
      for (int64_t r = 0; r < nq; r += strip) {
        score_ev->score_tile(b, h, q0 + r, std::min(strip, nq - r), kv0, nkv, pre + r * ld, s + r * ld, ld, ld);
      }
    } else if (s != pre) {
      for (int64_t i = 0; i < nq; ++i) std::copy(pre + i * ld, pre + i * ld + nkv, s + i * ld);
    }
    if (partial && band) {
      const T ninf = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < nq; ++i) {
        int64_t lo, hi;
        band->row(q0 + i, lo, hi);
        // kept columns [j0, j1) of the tile (lo and hi may be far outside it, even +-2^63)
        const int64_t j0 = lo <= kv0 ? 0 : std::min(lo - kv0, nkv);
        const int64_t j1 = hi < kv0 ? 0 : (hi - kv0 >= nkv ? nkv : hi - kv0 + 1);
        T* row = s + i * ld;
        if (j1 <= j0) {
          std::fill(row, row + nkv, ninf);
        } else {
          std::fill(row, row + j0, ninf);
          std::fill(row + j1, row + nkv, ninf);
        }
      }
    } else if (partial && mask_ev) {
      const T ninf = -std::numeric_limits<T>::infinity();
      for (int64_t r = 0; r < nq; r += strip) {
        const int64_t n = std::min(strip, nq - r);
        mask_ev->mask_tile(b, h, q0 + r, n, kv0, nkv, mask.data(), nkv);
        for (int64_t i = 0; i < n; ++i) {
          T* row = s + (r + i) * ld;
          const uint8_t* m = mask.data() + i * nkv;
          for (int64_t j = 0; j < nkv; ++j) row[j] = m[j] ? row[j] : ninf;
        }
      }
    }
  }
};

// T: the softmax's and the sums' type; In: q, k, v and out (T, or BFloat16 with T = float for the bf16
// products of AVX-512 BF16: bf16 Q K^T and P V with float32 sums, P rounded to bf16 as the GPU kernels do).
template <class T, class In = T>
void forward_impl(const FlexProblem& p, FlexForwardOutputs& o) {
  constexpr bool kBf16 = std::is_same_v<In, BFloat16>;
  const int64_t nQB = (p.Lq + p.block_q - 1) / p.block_q;
  const int64_t G = p.group();
  const In* q = p.q.data<In>();
  const In* k = p.k.data<In>();
  const In* v = p.v.data<In>();
  In* out = o.out.data<In>();
  T* lse = o.lse.data<T>();
  T* mx = o.max_scores.data<T>();
  const int64_t tasks = p.B * p.Hq * nQB;
  const T ninf = -std::numeric_limits<T>::infinity();
  use_single_threaded_blas();  // BLAS runs inside our OpenMP tasks
  ErrorSlot err;
#pragma omp parallel
  {
    TileScorer<T> scorer(p);
    // K^T (float, or bf16 pairs along E) and, for bf16, V as pairs of rows
    HeadPack kt(kKt, HeadPack::Transpose32), vrows(kVt, HeadPack::PairRows16);
    const int64_t ldp = (tile_cols(p) + 1) / 2;
    ScratchTile<uint32_t> ppairs(kPTile, kBf16 ? tile_rows(p) * ldp : 0);  // P as bf16 pairs
    ScratchTile<T> s(kScoreTile, tile_rows(p) * tile_cols(p)), acc(kAccTile, tile_rows(p) * p.Ev),
        m(kRowMax, tile_rows(p)), l(kRowSum, tile_rows(p)), bmax(kTileMax, tile_rows(p));
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      try {
        // A head's q blocks last to first: under a causal mask the longest rows go first and the short
        // ones fill the gaps at the end (dynamic schedule); consecutive tasks share the head's K^T.
        const int64_t qb = nQB - 1 - t % nQB, h = (t / nQB) % p.Hq, b = t / (nQB * p.Hq);
        const int64_t q0 = qb * p.block_q, nq = std::min(p.block_q, p.Lq - q0);
        const int64_t bk = p.Bkv == 1 ? 0 : b, hk = h / G;
        const In* qrows = q + ((b * p.Hq + h) * p.Lq + q0) * p.E;
        const In* kbase = k + (bk * p.Hkv + hk) * p.Lkv * p.E;
        const In* vbase = v + (bk * p.Hkv + hk) * p.Lkv * p.Ev;

        std::fill(m.data(), m.data() + nq, ninf);
        std::fill(l.data(), l.data() + nq, T(0));
        std::fill(acc.data(), acc.data() + nq * p.Ev, T(0));
        RowBlocks blocks = row_blocks(p.kv_lists, b, h, qb);
        const int64_t ld = tile_cols(p);
        for (int64_t bi = 0; bi < blocks.size(); ++bi) {
          const int64_t kv0 = static_cast<int64_t>(blocks.at(bi)) * p.block_kv;
          if (kv0 >= p.Lkv) continue;
          const int64_t nkv = std::min(p.block_kv, p.Lkv - kv0);
          if constexpr (kBf16) {
            const uint32_t* kp = kt.get(kbase, p.Lkv, p.E / 2, kv0, nkv);
            tile_kernels().gemm_bf16(false, nq, nkv, p.E / 2, static_cast<float>(p.scale),
                                     reinterpret_cast<const uint32_t*>(qrows), p.E / 2, kp, nkv, false,
                                     s.data(), ld);
            scorer.mods(b, h, q0, nq, kv0, nkv, blocks.is_partial(bi), s.data(), s.data(), ld);
          } else {
            scorer.compute(b, h, qrows, q0, nq, kbase + kv0 * p.E, transposed_block(kt, kbase, p.Lkv, p.E, kv0, nkv),
                           kv0, nkv, blocks.is_partial(bi), s.data(), s.data(), ld);
          }
          // The tile's row maxima first, in a loop of their own: the rows are independent there, where each
          // row's exp pass below waits on its max.
          for (int64_t i = 0; i < nq; ++i) bmax[i] = scorer.math.row_max(s.data() + i * ld, nkv);
          for (int64_t i = 0; i < nq; ++i) {
            T* row = s.data() + i * ld;
            // The running max m is NaN-sticky, as torch.amax: once a row has seen a NaN score, its m,
            // l, output and lse are NaN. The vector max above skips NaN (cheap); NaN is caught after.
            T mnew = std::max(m[i], bmax[i]);  // m[i] first: a NaN m[i] stays
            if (mnew == ninf) {
              // Only -inf and NaN here: -inf entries weigh 0; a NaN makes the row NaN (an empty row,
              // every score -inf so far, stays empty).
              bool nan = false;
              for (int64_t j = 0; j < nkv; ++j) {
                nan |= std::isnan(row[j]);
                row[j] = std::isnan(row[j]) ? row[j] : T(0);
              }
              if (nan) m[i] = l[i] = std::numeric_limits<T>::quiet_NaN();
              continue;
            }
            if (mnew == -ninf) {  // a +inf score: inf - inf below would hide whether a NaN was there too
              for (int64_t j = 0; j < nkv; ++j) mnew = std::isnan(row[j]) ? row[j] : mnew;
            }
            // (exp(0) = 1: no call when the max stays)
            const T corr = std::isfinite(mnew) && m[i] == mnew ? T(1) : std::exp(m[i] - mnew);
            // mnew is the row's max: the cheaper exp when it is finite
            T sum = std::isfinite(mnew) ? scorer.math.exp_sum_max(row, nkv, mnew) : scorer.math.exp_sum(row, nkv, mnew);
            // With a finite max every exp is in [0, 1], so a NaN sum means a NaN score.
            if (std::isnan(sum) && std::isfinite(mnew)) mnew = sum;
            l[i] = l[i] * corr + sum;
            m[i] = mnew;
            if (corr != T(1)) {
              T* a = acc.data() + i * p.Ev;
              for (int64_t e = 0; e < p.Ev; ++e) a[e] *= corr;
            }
          }
          if constexpr (kBf16) {  // kv0 is even (bf16_products)
            const TileKernels& tk = tile_kernels();
            const uint32_t* vp = vrows.get(vbase, p.Lkv, p.Ev, kv0, nkv);
            for (int64_t i = 0; i < nq; ++i) tk.to_bf16_pairs(s.data() + i * ld, nkv, ppairs.data() + i * ldp);
            tk.gemm_bf16(false, nq, p.Ev, (nkv + 1) / 2, 1.0f, ppairs.data(), ldp, vp, p.Ev, true,
                         acc.data(), p.Ev);
          } else {
            scorer.math.nn(false, nq, p.Ev, nkv, T(1), s.data(), ld, vbase + kv0 * p.Ev, p.Ev, true, acc.data(), p.Ev);
          }
        }
        const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
        for (int64_t i = 0; i < nq; ++i) {
          In* dst = out + (row0 + i) * p.Ev;
          // Every score -inf (or no block visited): output 0 and lse -inf, as flex_attention. A NaN m
          // gives NaN through l; a +inf max gives a NaN output (inf - inf) and lse +inf (torch.logsumexp).
          const bool empty = m[i] == ninf;
          const T inv = empty ? T(0) : T(1) / l[i];
          for (int64_t e = 0; e < p.Ev; ++e) dst[e] = static_cast<In>(acc[i * p.Ev + e] * inv);
          lse[row0 + i] = empty ? ninf : m[i] == -ninf ? m[i] : m[i] + std::log(l[i]);
          mx[row0 + i] = m[i];
        }
      } catch (...) {
        err.capture();
      }
    }
  }
  err.rethrow();
}

// Per-thread scratch of the backward: the recomputed tile and its gradients, the transposed K and V; for
// the bf16 products the head's K^T and V^T as pairs along E, K as pairs of rows, and the tile operands as
// bf16 pairs (P^T or dS^T, the q block's dO or Q rows, dS).
template <class T>
struct TileGrad {
  // d score_mod / d score and capture terms (none: constant, or a softcap, whose derivative the scorer gives)
  ThreadEvaluator<T> grad_ev;
  ScratchTile<T> pre, s, dp;
  HeadPack kt{kKt, HeadPack::Transpose32}, vt{kVt, HeadPack::Transpose32};  // float: K^T, V^T; bf16: as pairs
  HeadPack krows{kKRows, HeadPack::PairRows16};                              // bf16: K as pairs of rows
  ScratchTile<uint32_t> at_pairs, b_pairs, ds_pairs;
  TileGrad(const FlexProblem& p, bool bf16, bool scorer_gives_dscore)
      : grad_ev(kGradEval, p.score_grad && !p.score_grad->dscore_is_constant && !scorer_gives_dscore
                               ? &p.score_grad->program
                               : nullptr),
        pre(kPreTile, tile_rows(p) * tile_cols(p)),
        s(kScoreTile, tile_rows(p) * tile_cols(p)),
        dp(kGradTile, tile_rows(p) * tile_cols(p)),
        at_pairs(kPTile, bf16 ? (tile_rows(p) + 1) / 2 * tile_cols(p) : 0),
        b_pairs(kBTile, bf16 ? (tile_rows(p) + 1) / 2 * std::max(p.E, p.Ev) : 0),
        ds_pairs(kDsPairs, bf16 ? tile_rows(p) * ((tile_cols(p) + 1) / 2) : 0) {}
};

// What one thread of a backward parallel region works with, built once at the region's start: the tile
// scorer, the gradient scratch, the dS tile and, where the region adds captured-tensor gradients, its
// buffers for them and the derivative program's evaluator (for the capture terms when g.grad_ev, which
// has them too, is not there).
template <class T>
struct BackwardThreadState {
  TileScorer<T> sc;
  TileGrad<T> g;
  ScratchTile<T> ds;
  std::vector<std::vector<double>>* caps;  // [capture] gradient, this thread's; null: the region adds none
  ThreadEvaluator<T> cap_ev;
  BackwardThreadState(const FlexProblem& p, bool bf16, std::vector<std::vector<double>>* caps)
      : sc(p),
        g(p, bf16, sc.softcap.has_value()),
        ds(kDsTile, tile_rows(p) * tile_cols(p)),
        caps(caps),
        cap_ev(kCapEval, caps && !g.grad_ev ? &p.score_grad->program : nullptr) {}
};

// Integer value of an index tile (kept exact: no round trip through float).
inline int64_t tile_index(const TileValue& v, int64_t i, int64_t j) {
  const int64_t o = i * v.row_stride + j * v.col_stride;
  switch (v.kind) {
    case ValueKind::Int: return v.as<int64_t>()[o];
    case ValueKind::Bool: return v.as<uint8_t>()[o];
    default: FG_FAIL(ValueError, "flex_attention backward: a captured tensor was indexed with a float value");
  }
}

// T: the gradients' and sums' type; In: q, k, v, out and dout (T, or BFloat16 with T = float for the bf16
// products: every tile product multiplies bf16 pairs with float32 sums, P and dS rounded to bf16).
template <class T, class In = T>
void backward_impl(const FlexProblem& p, const Tensor& out_t, const Tensor& lse_t, const Tensor& dout_t,
                   const Tensor& dlse_t, const std::vector<bool>& needs_cap, FlexBackwardOutputs& o) {
  constexpr bool kBf16 = std::is_same_v<In, BFloat16>;
  const int64_t nQB = (p.Lq + p.block_q - 1) / p.block_q;
  const int64_t nKB = (p.Lkv + p.block_kv - 1) / p.block_kv;
  const int64_t G = p.group();
  const In* q = p.q.data<In>();
  const In* k = p.k.data<In>();
  const In* v = p.v.data<In>();
  const In* out = out_t.data<In>();
  const T* lse = lse_t.data<T>();
  const In* dout = dout_t.data<In>();
  T* dq = o.dq.data<T>();
  T* dk = o.dk.data<T>();
  T* dv = o.dv.data<T>();
  const int64_t ld = tile_cols(p);
  const T ninf = -std::numeric_limits<T>::infinity();
  const TileMath<T> math;

  // delta_i = rowsum(dO_i * O_i) - dlse_i: the softmax backward's row term (a gradient on lse folds in here).
  std::vector<T> delta(p.B * p.Hq * p.Lq);
  const T* dlse = dlse_t.defined() ? dlse_t.data<T>() : nullptr;
#pragma omp parallel for if (delta.size() > 4096)
  for (int64_t r = 0; r < static_cast<int64_t>(delta.size()); ++r) {
    T acc = 0;
    for (int64_t e = 0; e < p.Ev; ++e) acc += static_cast<T>(dout[r * p.Ev + e]) * static_cast<T>(out[r * p.Ev + e]);
    delta[r] = dlse ? acc - dlse[r] : acc;
  }

  // Recomputes the tile: g.pre = scale q.k, g.s = P (0 where masked or the row is empty), g.dp = dS
  // with respect to the modified score.
  // kvhead: (kv batch * Hkv + kv head), whose rows kv0.. the tile reads.
  auto tile_ds = [&](BackwardThreadState<T>& st, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0,
                     int64_t nkv, bool partial, int64_t kvhead) {
    TileGrad<T>& g = st.g;
    TileScorer<T>& sc = st.sc;
    const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
    T* dscore = sc.softcap ? st.ds.data() : nullptr;  // a softcap's derivative, for apply_dscore
    if constexpr (kBf16) {
      const TileKernels& tk = tile_kernels();
      const uint32_t* kp = g.kt.get(k + kvhead * p.Lkv * p.E, p.Lkv, p.E / 2, kv0, nkv);
      tk.gemm_bf16(false, nq, nkv, p.E / 2, static_cast<float>(p.scale),
                   reinterpret_cast<const uint32_t*>(q + row0 * p.E), p.E / 2, kp, nkv, false, g.pre.data(),
                   ld);
      sc.mods(b, h, q0, nq, kv0, nkv, partial, g.pre.data(), g.s.data(), ld, dscore);
    } else {
      const T* ktc = transposed_block(g.kt, k + kvhead * p.Lkv * p.E, p.Lkv, p.E, kv0, nkv);
      sc.compute(b, h, q + row0 * p.E, q0, nq, k + (kvhead * p.Lkv + kv0) * p.E, ktc, kv0, nkv, partial, g.pre.data(),
                 g.s.data(), ld, dscore);
    }
    for (int64_t i = 0; i < nq; ++i) {
      T* row = g.s.data() + i * ld;
      const T li = lse[row0 + i];
      if (li == ninf) {
        std::fill(row, row + nkv, T(0));
        continue;
      }
      // P = e^(s - lse) with lse >= the row's max: the cheaper exp when lse is finite
      if (std::isfinite(li)) math.exp_sum_max(row, nkv, li);
      else math.exp_sum(row, nkv, li);
    }
    if constexpr (kBf16) {  // dP = dO V^T
      const uint32_t* vp = g.vt.get(v + kvhead * p.Lkv * p.Ev, p.Lkv, p.Ev / 2, kv0, nkv);
      tile_kernels().gemm_bf16(false, nq, nkv, p.Ev / 2, 1.0f, reinterpret_cast<const uint32_t*>(dout + row0 * p.Ev),
                               p.Ev / 2, vp, nkv, false, g.dp.data(), ld);
    } else {
      const T* vtc = transposed_block(g.vt, v + kvhead * p.Lkv * p.Ev, p.Lkv, p.Ev, kv0, nkv);
      math.nt(nq, nkv, p.Ev, T(1), dout + row0 * p.Ev, p.Ev, v + (kvhead * p.Lkv + kv0) * p.Ev, p.Ev, vtc, nkv,
              g.dp.data(), ld);
    }
    for (int64_t i = 0; i < nq; ++i) math.softmax_grad(g.dp.data() + i * ld, g.s.data() + i * ld, nkv, delta[row0 + i]);
  };
  // dS = g.dp * d score_mod / d score (evaluated at the pre-mod score), in ds; g.dp itself when the
  // derivative is the constant 1 (no score_mod, or one that only adds). A softcap's derivative is in ds
  // already (tile_ds).
  auto apply_dscore = [&](BackwardThreadState<T>& st, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0,
                          int64_t nkv) -> const T* {
    TileGrad<T>& g = st.g;
    T* ds = st.ds.data();
    if (st.sc.softcap) {
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nkv; ++j) ds[i * ld + j] *= g.dp[i * ld + j];
      return ds;
    }
    if (g.grad_ev) {
      g.grad_ev->run(b, h, q0, nq, kv0, nkv, g.pre.data(), ld);
      TileValue f = g.grad_ev->output(0);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nkv; ++j) ds[i * ld + j] = g.dp[i * ld + j] * tile_at<T>(f, i, j);
      return ds;
    }
    const T c = p.score_grad ? static_cast<T>(p.score_grad->dscore_constant) : T(1);
    if (c == T(1)) return g.dp.data();
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t j = 0; j < nkv; ++j) ds[i * ld + j] = g.dp[i * ld + j] * c;
    return ds;
  };

  // C (nkv x cols) += alpha X^T R over the tile's q rows: X is the tile's P or dS (nq x nkv, ld), R the q
  // block's rows (nq x cols) of dO or Q from row0: dV += P^T dO, dK += scale dS^T Q.
  auto add_transposed = [&](TileGrad<T>& g, const T* x, int64_t nq, int64_t nkv, T alpha, const In* rows, int64_t cols,
                            T* c) {
    if constexpr (kBf16) {
      const TileKernels& tk = tile_kernels();
      tk.pair_rows_f32(x, ld, nq, nkv, g.at_pairs.data(), nkv);  // X^T: A transposed, pairs along q
      tk.pair_rows_bf16(reinterpret_cast<const uint16_t*>(rows), cols, nq, cols, g.b_pairs.data(), cols);
      tk.gemm_bf16(true, nkv, cols, (nq + 1) / 2, alpha, g.at_pairs.data(), nkv, g.b_pairs.data(), cols, true, c, cols);
    } else {
      math.nn(true, nkv, cols, nq, alpha, x, ld, rows, cols, true, c, cols);
    }
  };
  // dQ rows (nq x E) += scale dS K over the kv block kv0.. of kv head kvhead.
  auto add_dq = [&](TileGrad<T>& g, const T* ds, int64_t nq, int64_t nkv, int64_t kvhead, int64_t kv0, T* dqr) {
    const In* khead = k + kvhead * p.Lkv * p.E;
    if constexpr (kBf16) {  // kv0 is even (bf16_products)
      const TileKernels& tk = tile_kernels();
      const int64_t ldp = (tile_cols(p) + 1) / 2;
      for (int64_t i = 0; i < nq; ++i) tk.to_bf16_pairs(ds + i * ld, nkv, g.ds_pairs.data() + i * ldp);
      const uint32_t* kr = g.krows.get(khead, p.Lkv, p.E, kv0, nkv);
      tk.gemm_bf16(false, nq, p.E, (nkv + 1) / 2, static_cast<float>(p.scale), g.ds_pairs.data(), ldp,
                   kr, p.E, true, dqr, p.E);
    } else {
      math.nn(false, nq, p.E, nkv, static_cast<T>(p.scale), ds, ld, khead + kv0 * p.E, p.E, true, dqr, p.E);
    }
  };

  // Captured-tensor gradients: per thread in double, summed in thread order after the passes.
  const size_t ncaps = p.score_grad ? p.score_grad->captures.size() : 0;
  bool any_cap = false;
  for (size_t c = 0; c < ncaps; ++c) any_cap = any_cap || (c < needs_cap.size() && needs_cap[c]);
  const int nthreads = omp_get_max_threads();
  std::vector<std::vector<std::vector<double>>> cap_acc(nthreads);  // [thread][slot] gradient buffers
  // This thread's state for a parallel region; with `captures` (and captured gradients wanted) its zeroed
  // captured-gradient buffers.
  auto thread_state = [&](bool captures) {
    std::vector<std::vector<double>>* mine = nullptr;
    if (captures && any_cap) {
      mine = &cap_acc[omp_get_thread_num()];
      mine->resize(ncaps);
      for (size_t c = 0; c < ncaps; ++c) {
        if (needs_cap[c]) (*mine)[c].assign(p.score_grad->captures[c].tensor.numel(), 0.0);
      }
    }
    return BackwardThreadState<T>(p, kBf16, mine);
  };
  // Adds the tile's captured gradients (g.dp: the gradient w.r.t. the modified score) into st.caps.
  auto add_capture_grads = [&](BackwardThreadState<T>& st, int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0,
                               int64_t nkv) {
    TileGrad<T>& g = st.g;
    std::vector<std::vector<double>>& mine = *st.caps;
    TileEvaluator<T>& ev = g.grad_ev ? *g.grad_ev : *st.cap_ev;
    if (!g.grad_ev) ev.run(b, h, q0, nq, kv0, nkv, g.pre.data(), ld);
    for (const CaptureGradTerm& term : p.score_grad->terms) {
      if (!needs_cap[term.capture]) continue;
      const Shape& cs = p.score_grad->captures[term.capture].tensor.sizes();
      std::vector<double>& buf = mine[term.capture];
      const TileValue deriv = ev.output(term.deriv_output);
      for (int64_t i = 0; i < nq; ++i) {
        for (int64_t j = 0; j < nkv; ++j) {
          const double gs = g.dp[i * ld + j];
          if (gs == 0.0) continue;
          int64_t lin = 0;
          for (int32_t d = 0; d < term.ndim; ++d) {
            int64_t idx = tile_index(ev.output(term.index_output + d), i, j);
            FG_CHECK(idx >= -cs[d] && idx < cs[d], IndexError,
                     "flex_attention backward: index {} out of range for dim {} (size {}) of a captured tensor", idx,
                     d, cs[d]);
            lin = lin * cs[d] + (idx < 0 ? idx + cs[d] : idx);
          }
          buf[lin] += gs * static_cast<double>(tile_at<T>(deriv, i, j));
        }
      }
    }
  };

  // dK and dV of kv block kb of kv head (bk, hk), zeroed here, summed over the q blocks its transposed lists give for
  // every q head of its GQA group and every batch broadcast onto it; after each tile's dK, per_tile(b, h, q0, nq, kv0,
  // nkv, dS) (the one-pass form's dQ and captured gradients).
  auto kv_block_grads = [&](BackwardThreadState<T>& st, int64_t bk, int64_t hk, int64_t kb, auto&& per_tile) {
    TileGrad<T>& g = st.g;
    const int64_t kv0 = kb * p.block_kv, nkv = std::min(p.block_kv, p.Lkv - kv0);
    const int64_t kvhead = bk * p.Hkv + hk, kvrow = kvhead * p.Lkv + kv0;
    T* dkr = dk + kvrow * p.E;
    T* dvr = dv + kvrow * p.Ev;
    std::fill(dkr, dkr + nkv * p.E, T(0));
    std::fill(dvr, dvr + nkv * p.Ev, T(0));
    const int64_t b_lo = p.Bkv == 1 ? 0 : bk, b_hi = p.Bkv == 1 ? p.B : bk + 1;
    for (int64_t b = b_lo; b < b_hi; ++b) {
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        RowBlocks blocks = row_blocks(p.q_lists, b, h, kb);
        for (int64_t bi = 0; bi < blocks.size(); ++bi) {
          const int64_t q0 = static_cast<int64_t>(blocks.at(bi)) * p.block_q;
          if (q0 >= p.Lq) continue;
          const int64_t nq = std::min(p.block_q, p.Lq - q0);
          const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
          tile_ds(st, b, h, q0, nq, kv0, nkv, blocks.is_partial(bi), kvhead);
          add_transposed(g, g.s.data(), nq, nkv, T(1), dout + row0 * p.Ev, p.Ev, dvr);  // dV += P^T dO
          const T* dsp = apply_dscore(st, b, h, q0, nq, kv0, nkv);
          add_transposed(g, dsp, nq, nkv, static_cast<T>(p.scale), q + row0 * p.E, p.E, dkr);  // dK
          per_tile(b, h, q0, nq, kv0, nkv, dsp);
        }
      }
    }
  };

  use_single_threaded_blas();  // BLAS runs inside our OpenMP tasks
  ErrorSlot err;
  const int64_t kv_heads = p.Bkv * p.Hkv;
  if (kv_heads >= 2 * nthreads) {
    // ---- one pass per (kv batch, kv head), when there are enough of them for every thread: its kv blocks in
    // turn, each over the q blocks the transposed lists give, for every q head of its GQA group and batch
    // broadcast onto it. The task is the only writer of its dK, dV and of those heads' dQ rows, so every tile
    // is recomputed once (the two passes below recompute each twice).
#pragma omp parallel
    {
      BackwardThreadState<T> st = thread_state(true);
#pragma omp for schedule(static, 1)
      for (int64_t t = 0; t < kv_heads; ++t) {
        try {
          const int64_t hk = t % p.Hkv, bk = t / p.Hkv;
          const int64_t b_lo = p.Bkv == 1 ? 0 : bk, b_hi = p.Bkv == 1 ? p.B : bk + 1;
          for (int64_t b = b_lo; b < b_hi; ++b) {
            for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
              T* dqh = dq + (b * p.Hq + h) * p.Lq * p.E;
              std::fill(dqh, dqh + p.Lq * p.E, T(0));
            }
          }
          for (int64_t kb = 0; kb < nKB; ++kb) {
            kv_block_grads(st, bk, hk, kb, [&](int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv,
                                               const T* dsp) {
              add_dq(st.g, dsp, nq, nkv, t, kv0, dq + ((b * p.Hq + h) * p.Lq + q0) * p.E);  // dQ += scale dS K
              if (st.caps) add_capture_grads(st, b, h, q0, nq, kv0, nkv);
            });
          }
        } catch (...) {
          err.capture();
        }
      }
    }
    err.rethrow();
  } else {
    // ---- pass 1: dK, dV per (kv batch, kv head, kv block)
    const int64_t kv_tasks = p.Bkv * p.Hkv * nKB;
#pragma omp parallel
    {
      BackwardThreadState<T> st = thread_state(false);
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < kv_tasks; ++t) {
        try {
          const int64_t kb = t % nKB, hk = (t / nKB) % p.Hkv, bk = t / (nKB * p.Hkv);
          kv_block_grads(st, bk, hk, kb, [](int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*) {});
        } catch (...) {
          err.capture();
        }
      }
    }
    err.rethrow();

    // ---- pass 2: dQ and captured gradients per (b, h, q block)
    const int64_t q_tasks = p.B * p.Hq * nQB;
#pragma omp parallel
    {
      BackwardThreadState<T> st = thread_state(true);
      TileGrad<T>& g = st.g;
#pragma omp for schedule(static, 1)
      for (int64_t t = 0; t < q_tasks; ++t) {
        try {
          // Every other head walks its q blocks backwards: the static schedule deals thread j the same
          // block positions of every head, so under a causal mask it would get rows of one length only.
          const int64_t bh = t / nQB, h = bh % p.Hq, b = bh / p.Hq;
          const int64_t qb = bh % 2 ? nQB - 1 - t % nQB : t % nQB;
          const int64_t q0 = qb * p.block_q, nq = std::min(p.block_q, p.Lq - q0);
          const int64_t bk = p.Bkv == 1 ? 0 : b, hk = h / G;
          const int64_t row0 = (b * p.Hq + h) * p.Lq + q0;
          T* dqr = dq + row0 * p.E;
          std::fill(dqr, dqr + nq * p.E, T(0));
          RowBlocks blocks = row_blocks(p.kv_lists, b, h, qb);
          for (int64_t bi = 0; bi < blocks.size(); ++bi) {
            const int64_t kv0 = static_cast<int64_t>(blocks.at(bi)) * p.block_kv;
            if (kv0 >= p.Lkv) continue;
            const int64_t nkv = std::min(p.block_kv, p.Lkv - kv0);
            tile_ds(st, b, h, q0, nq, kv0, nkv, blocks.is_partial(bi), bk * p.Hkv + hk);
            const T* dsp = apply_dscore(st, b, h, q0, nq, kv0, nkv);
            add_dq(g, dsp, nq, nkv, bk * p.Hkv + hk, kv0, dqr);  // dQ += scale dS K
            if (st.caps) add_capture_grads(st, b, h, q0, nq, kv0, nkv);
          }
        } catch (...) {
          err.capture();
        }
      }
    }
    err.rethrow();
  }
  o.dcaps.assign(ncaps, Tensor());
  for (size_t c = 0; c < ncaps; ++c) {
    if (!(c < needs_cap.size() && needs_cap[c])) continue;
    Tensor gcap = zeros(p.score_grad->captures[c].tensor.sizes(), kFloat64);
    double* dst = gcap.data<double>();
    for (int th = 0; th < nthreads; ++th) {  // fixed order: deterministic for a given thread count
      if (cap_acc[th].size() <= c) continue;
      const auto& src = cap_acc[th][c];
      for (size_t i = 0; i < src.size(); ++i) dst[i] += src[i];
    }
    o.dcaps[c] = gcap;
  }
}

// Whether a bfloat16 problem runs the bf16 products: the CPU has them, E and Ev split into pairs and every
// kv block starts on a pair of K and V rows.
bool bf16_products(const FlexProblem& p) {
  return tile_kernels().gemm_bf16 && p.E % 2 == 0 && p.Ev % 2 == 0 && (p.block_kv % 2 == 0 || p.Lkv <= p.block_kv);
}

// A bfloat16 problem with q, k, v in float32 (the float32 kernels, on CPUs without bf16 products and in
// the backward).
FlexProblem as_float32(const FlexProblem& p) {
  FlexProblem f = p;
  f.q = p.q.to(kFloat32);
  f.k = p.k.to(kFloat32);
  f.v = p.v.to(kFloat32);
  return f;
}

void flex_forward_cpu(const FlexProblem& p, FlexForwardOutputs& o) {
  if (p.q.dtype() == kFloat64) {
    forward_impl<double>(p, o);
  } else if (p.q.dtype() == kBFloat16) {
    if (bf16_products(p)) {
      forward_impl<float, BFloat16>(p, o);
      return;
    }
    FlexForwardOutputs f{empty(o.out.sizes(), kFloat32), o.lse, o.max_scores};
    forward_impl<float>(as_float32(p), f);
    o.out = f.out.to(kBFloat16);
  } else {
    forward_impl<float>(p, o);
  }
}

void flex_backward_cpu(const FlexProblem& p, const Tensor& out, const Tensor& lse, const Tensor& dout,
                       const Tensor& dlse, const std::vector<bool>& needs_cap, FlexBackwardOutputs& o) {
  if (p.q.dtype() == kFloat64) {
    backward_impl<double>(p, out, lse, dout, dlse, needs_cap, o);
  } else if (p.q.dtype() == kBFloat16) {  // gradients summed in float32, rounded to bf16 at the end
    FlexBackwardOutputs f{empty(o.dq.sizes(), kFloat32), empty(o.dk.sizes(), kFloat32), empty(o.dv.sizes(), kFloat32), {}};
    if (bf16_products(p)) {
      backward_impl<float, BFloat16>(p, out, lse, dout, dlse, needs_cap, f);
    } else {
      backward_impl<float>(as_float32(p), out.to(kFloat32), lse, dout.to(kFloat32), dlse, needs_cap, f);
    }
    o.dq = f.dq.to(kBFloat16);
    o.dk = f.dk.to(kBFloat16);
    o.dv = f.dv.to(kBFloat16);
    o.dcaps = std::move(f.dcaps);
  } else {
    backward_impl<float>(p, out, lse, dout, dlse, needs_cap, o);
  }
}

}  // namespace

FG_REGISTER_KERNEL(flex_forward_stub, CPU, &flex_forward_cpu);
FG_REGISTER_KERNEL(flex_backward_stub, CPU, &flex_backward_cpu);

}  // namespace fg::cpu
