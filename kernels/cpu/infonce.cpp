// CPU kernels of the subvector-InfoNCE primitive: rows Q (M x d) against columns K (C x d), both
// L2-normalized and contiguous in the working dtype (float32, or float64 for gradcheck).
//
//   S = scale * Q K^T,  one positive column pos[i] per row, an optional excluded column excl[i]
//   (-1: none) whose entry is removed from both the row and the column softmax.
//
// Forward returns per-row log-sum-exp and positive logit, and per-column partial (max, sum-exp)
// over these rows, which the caller merges across ranks. Backward recomputes S tile by tile from
// the saved LSEs. Neither ever holds more than one row tile x column tile of S per thread, so the
// memory is O((M + C) * d + threads * tile).
//
// Or, where the caller's budget holds M x C (small batches, where the products dominate less and
// one of four is worth its memory): the forward keeps the unit dot products Q K^T, one matrix
// product, and returns them (under the fixed shift with the excluded entries -inf); the backward
// reads its tiles there instead of recomputing them: three products instead of four (ntxent on
// one process keeps about two, as its recomputing path, which skips half of the symmetric S).
//
// Tiles go through ATen's BLAS (at::mm_out into a per-thread buffer) and ATen's vectorized
// elementwise ops, so the exp/sum passes run on a tile while it is still in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace directclr {
namespace {

// A 256 x 1024 fp32 tile is 1 MiB: it stays in L2 between the GEMM and the exp/sum passes.
constexpr int64_t kMaxRowTile = 256;
constexpr int64_t kMinRowTile = 32;
constexpr int64_t kColTile = 1024;
constexpr int64_t kMinColTile = 64;
constexpr int64_t kMaxThreadPartials = int64_t(1) << 25;  // 128 MiB of fp32 column gradients

// Row tiles shrink when there are few rows so that every thread still gets work.
int64_t row_tile_size(int64_t rows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t even_share = (rows + threads - 1) / threads;
  return std::clamp(even_share, kMinRowTile, kMaxRowTile);
}

void check_inputs(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos,
                  const at::Tensor& excl) {
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2, "rows and cols must be 2-D");
  TORCH_CHECK(rows.size(1) == cols.size(1), "rows and cols must have the same width");
  TORCH_CHECK(rows.is_contiguous() && cols.is_contiguous(), "rows and cols must be contiguous");
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), "rows and cols must share a dtype");
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "the working dtype must be float32 or float64");
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), "CPU kernel got a non-CPU tensor");
  TORCH_CHECK(pos.scalar_type() == at::kLong && excl.scalar_type() == at::kLong,
              "pos and excl must be int64");
  TORCH_CHECK(pos.numel() == rows.size(0) && excl.numel() == rows.size(0),
              "pos and excl need one entry per row");
}

// A tile of unit dot products, rows row0.. (`row_block`) against columns col0.. (`col_block`),
// shaped as `scratch`: one product into scratch, or where `kept` (the forward's M x C product) is
// given, its tile: the view itself when the caller only masks the tile's excluded entries and
// reads it (the fixed shift: masking is idempotent, so the kept dots stay valid for another
// backward), else a copy in scratch (the running max scales the tile in place).
at::Tensor tile_dots(at::Tensor& scratch, const at::Tensor& kept, const at::Tensor& row_block,
                     int64_t row0, int64_t col0, const at::Tensor& col_block, bool in_place) {
  if (kept.numel() == 0) return at::mm_out(scratch, row_block, col_block.t());
  auto tile = kept.narrow(0, row0, scratch.size(0)).narrow(1, col0, scratch.size(1));
  return in_place ? tile : scratch.copy_(tile);
}

// The forward's M x C unit dot products when `keep`, in one product (else an empty 0 x 0).
at::Tensor kept_dots(const at::Tensor& rows, const at::Tensor& cols, bool keep) {
  return keep ? at::mm(rows, cols.t()) : at::empty({0, 0}, rows.options());
}

// Removes each row's excluded column from the tile (exp(-inf) = 0 in both softmaxes).
template <typename scalar_t>
void mask_excluded(at::Tensor& tile, const int64_t* excl, int64_t row0, int64_t col0) {
  auto* data = tile.data_ptr<scalar_t>();
  const int64_t n_rows = tile.size(0), n_cols = tile.size(1), ld = tile.stride(0);
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t j = excl[row0 + i] - col0;
    if (j >= 0 && j < n_cols) data[i * ld + j] = -std::numeric_limits<scalar_t>::infinity();
  }
}


// dots (unit dot products, |dots| <= 1 up to rounding) -> logits, scale * dots, in place. Near the
// temperature's bound scale is near the dtype's max, where a dot rounded above 1 would overflow
// to inf (then inf - inf = NaN in the softmax): there the dots are clamped to [-1, 1] first.
void scale_dots(at::Tensor& dots, double scale) {
  const double largest = dots.scalar_type() == at::kFloat ? std::numeric_limits<float>::max()
                                                          : std::numeric_limits<double>::max();
  if (scale > 0.5 * largest) dots.clamp_(-1.0, 1.0);
  dots.mul_(scale);
}

// ----------------------------------------------------------------------------- fixed shift (fp32)
// Rows and columns are unit (or zero) vectors, so every logit lies in [-scale, scale]: exp(S -
// scale) is in [exp(-2 scale), 1] and needs no running max while exp(-2 scale) stays a normal
// float. Then one pass over a tile gives the row sums and the column partial sums at once, and
// the backward needs one exp per logit instead of two (exp(S - lse) = exp(S - scale) exp(scale -
// lse)). Larger scales (tau < 1/kMaxFixedShift) keep the online-max path.
constexpr double kMaxFixedShift = 40.0;  // exp(-80) = 1.8e-35, far above FLT_MIN (1.2e-38)

// Eight floats as one value (GCC's and Clang's vector extension, lowered to the target's SIMD
// registers: one AVX2 register, two SSE or NEON ones). The exp loops below are written with it:
// their auto-vectorized scalar form reloaded its constants from memory and spilled its partial
// sums to the stack on every iteration, at about twice the time per logit.
typedef float Floats8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));
constexpr int64_t kFloats8 = 8;

inline Floats8 load8(const float* p) {
  Floats8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, Floats8 v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 without branches: 2^k 2^f with k the nearest integer to t = x log2(e) (the
// 1.5 * 2^23 rounding trick) and f = t - k in [-1/2, 1/2], 2^f by the Taylor series of exp(f ln 2)
// to degree 7 (truncation 6e-9, under one ulp), Horner's rule. x < -87 (a masked logit's -inf
// included) gives exactly 0. V is float or Floats8: the tails of the vector loops round as their
// bodies.
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundingShift = 12582912.0f;
constexpr float kExpFloor = -87.0f;

template <typename V>
inline V exp2_fraction(V f) {
  constexpr float c2 = kLn2 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4,
                  c5 = c4 * kLn2 / 5, c6 = c5 * kLn2 / 6, c7 = c6 * kLn2 / 7;
  V p = f * c7 + c6;
  p = p * f + c5;
  p = p * f + c4;
  p = p * f + c3;
  p = p * f + c2;
  p = p * f + kLn2;
  return p * f + 1.0f;
}

inline float exp_nonpositive(float x) {
  const float t = std::max(x, kExpFloor) * kLog2e;
  const float k = (t + kRoundingShift) - kRoundingShift;
  const float two_k = std::bit_cast<float>((static_cast<int32_t>(k) + 127) << 23);
  return x < kExpFloor ? 0.0f : exp2_fraction(t - k) * two_k;
}

inline Floats8 exp_nonpositive(Floats8 x) {
  const Floats8 floor = Floats8{} + kExpFloor;
  const Floats8 t = (x < kExpFloor ? floor : x) * kLog2e;
  const Floats8 k = (t + kRoundingShift) - kRoundingShift;
  const Floats8 two_k = reinterpret_cast<Floats8>((__builtin_convertvector(k, Ints8) + 127) << 23);
  return x < kExpFloor ? Floats8{} : exp2_fraction(t - k) * two_k;
}

// For one row of a tile: dots[j] (unit dot products, -inf where masked) -> adds exp(scale dots[j]
// - scale) to col_acc[j] (kWithCols) and returns their sum over j, in a fixed order: 16 lanes,
// the tail, then the lanes in order. A template parameter rather than a null test in the loop.
template <bool kWithCols>
inline float shifted_exp_row(const float* dots, int64_t n, float scale, float* col_acc) {
  Floats8 low = {}, high = {};
  int64_t j = 0;
  for (; j + 2 * kFloats8 <= n; j += 2 * kFloats8) {
    const Floats8 e_low = exp_nonpositive(load8(dots + j) * scale - scale);
    const Floats8 e_high = exp_nonpositive(load8(dots + j + kFloats8) * scale - scale);
    low += e_low;
    high += e_high;
    if constexpr (kWithCols) {
      store8(col_acc + j, load8(col_acc + j) + e_low);
      store8(col_acc + j + kFloats8, load8(col_acc + j + kFloats8) + e_high);
    }
  }
  float total = 0.0f;
  for (; j < n; ++j) {
    const float e = exp_nonpositive(dots[j] * scale - scale);
    total += e;
    if constexpr (kWithCols) col_acc[j] += e;
  }
  for (int l = 0; l < kFloats8; ++l) total += low[l];
  for (int l = 0; l < kFloats8; ++l) total += high[l];
  return total;
}

// dots (a tile of unit dot products, -inf where masked; rows dots_ld apart) -> grad (contiguous)
// = exp(scale dots - scale) (row_coef_i + col_coef_j); kWithCols false: no column term.
template <bool kWithCols>
inline void shifted_grad_tile(const float* dots, int64_t dots_ld, float* grad, int64_t n_rows,
                              int64_t n_cols, float scale, const float* row_coef,
                              const float* col_coef) {
  for (int64_t i = 0; i < n_rows; ++i) {
    const float* d = dots + i * dots_ld;
    float* g = grad + i * n_cols;
    const float a = row_coef[i];
    int64_t j = 0;
    for (; j + kFloats8 <= n_cols; j += kFloats8) {
      const Floats8 p = exp_nonpositive(load8(d + j) * scale - scale);
      if constexpr (kWithCols) {
        store8(g + j, p * (load8(col_coef + j) + a));
      } else {
        store8(g + j, p * a);
      }
    }
    for (; j < n_cols; ++j) {
      const float p = exp_nonpositive(d[j] * scale - scale);
      g[j] = kWithCols ? p * (a + col_coef[j]) : p * a;
    }
  }
}

bool fixed_shift(const at::Tensor& rows, double scale) {
  return rows.scalar_type() == at::kFloat && scale <= kMaxFixedShift;
}

// ntxent on one process: the columns are the rows themselves and the excluded entries the
// diagonal, so S (and its mask) is symmetric and a tile's column sums are the row sums of its
// mirror tile.
bool symmetric_logits(const at::Tensor& rows, const at::Tensor& cols, const int64_t* excl_ptr) {
  if (rows.data_ptr() != cols.data_ptr() || rows.sizes() != cols.sizes()) return false;
  for (int64_t i = 0; i < rows.size(0); ++i) {
    if (excl_ptr[i] != i) return false;
  }
  return true;
}

// Symmetric S is swept in column blocks of width col_tile_max (a power of two), each against the
// row tiles that start before the block ends. Row tiles are a power of two no wider than the
// block, so none straddles a block's start: each is wholly before the block (a mirror tile) or
// inside it.
int64_t power_of_two_floor(int64_t n) {
  return static_cast<int64_t>(std::bit_floor(static_cast<uint64_t>(n)));
}

int64_t symmetric_row_tile(int64_t rows, int64_t col_tile_max) {
  return std::min(power_of_two_floor(row_tile_size(rows)), col_tile_max);
}

int64_t row_tiles_before_end(int64_t n_row_tiles, int64_t row_tile, int64_t col_end) {
  return std::min(n_row_tiles, (col_end + row_tile - 1) / row_tile);
}

// Calls body(first, size, block) on consecutive blocks of `block_rows` rows of `t`, the last
// one shorter: the column tiles that every kernel below walks.
template <typename Body>
void for_each_block(const at::Tensor& t, int64_t block_rows, Body&& body) {
  const int64_t n = t.size(0);
  for (int64_t first = 0; first < n; first += block_rows) {
    const int64_t size = std::min(block_rows, n - first);
    body(first, size, t.narrow(0, first, size));
  }
}

// lse_forward for fp32 with the fixed shift: column partials are (scale, sum exp(S - scale)).
// Symmetric S (and no column statistics asked for): only row tiles that start before the column
// block's end are computed; one wholly before it (a mirror tile) gives its rows their row sums and
// the block's rows their column sums in the same pass, so about half the forward's products.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward_fixed_shift(
    const at::Tensor& rows, const at::Tensor& cols, const int64_t* pos_ptr,
    const int64_t* excl_ptr, double scale, bool with_cols, const at::Tensor& kept) {
  const int64_t n_rows = rows.size(0), n_cols = cols.size(0);
  const auto opts = rows.options();
  const float shift = static_cast<float>(scale);
  const bool symmetric = !with_cols && symmetric_logits(rows, cols, excl_ptr);
  auto row_sum = at::zeros({n_rows}, opts);
  auto pos_logit = at::zeros({n_rows}, opts);
  auto col_sum = with_cols ? at::zeros({n_cols}, opts) : at::empty({0}, opts);
  const int64_t row_tile =
      symmetric ? symmetric_row_tile(n_rows, kColTile) : row_tile_size(n_rows);
  const int64_t n_row_tiles = (n_rows + row_tile - 1) / row_tile;
  const int64_t n_threads = at::get_num_threads();
  float* row_sum_ptr = row_sum.data_ptr<float>();
  float* pos_ptr_out = pos_logit.data_ptr<float>();

  for_each_block(cols, kColTile, [&](int64_t col0, int64_t col_tile, const auto& col_block) {
    const int64_t tiles_here =
        symmetric ? row_tiles_before_end(n_row_tiles, row_tile, col0 + col_tile) : n_row_tiles;
    auto thread_col_sum =
        with_cols || symmetric ? at::zeros({n_threads, col_tile}, opts) : at::Tensor();
    at::parallel_for(0, tiles_here, 1, [&](int64_t first, int64_t last) {
      const int64_t tid = at::get_thread_num();
      auto dots_buf = at::empty({row_tile, col_tile}, opts);
      for (int64_t t = first; t < last; ++t) {
        const int64_t row0 = t * row_tile;
        const int64_t rows_here = std::min(row_tile, n_rows - row0);
        const bool mirror = symmetric && row0 + rows_here <= col0;
        float* col_acc = with_cols || mirror ? thread_col_sum[tid].data_ptr<float>() : nullptr;
        auto scratch = dots_buf.narrow(0, 0, rows_here);
        at::Tensor dots =
            tile_dots(scratch, kept, rows.narrow(0, row0, rows_here), row0, col0, col_block, true);
        float* data = dots.data_ptr<float>();
        const int64_t ld = dots.stride(0);
        for (int64_t i = 0; i < rows_here; ++i) {
          const int64_t j = pos_ptr[row0 + i] - col0;
          if (j >= 0 && j < col_tile) pos_ptr_out[row0 + i] = data[i * ld + j] * shift;
        }
        if (mirror) {  // the block's rows do not reach these columns: S[c, pos c] = S[pos c, c]
          for (int64_t j = 0; j < col_tile; ++j) {
            const int64_t i = pos_ptr[col0 + j] - row0;
            if (i >= 0 && i < rows_here) pos_ptr_out[col0 + j] = data[i * ld + j] * shift;
          }
        }
        mask_excluded<float>(dots, excl_ptr, row0, col0);
        for (int64_t i = 0; i < rows_here; ++i) {
          row_sum_ptr[row0 + i] +=
              col_acc ? shifted_exp_row<true>(data + i * ld, col_tile, shift, col_acc)
                      : shifted_exp_row<false>(data + i * ld, col_tile, shift, nullptr);
        }
      }
    });
    if (with_cols) col_sum.narrow(0, col0, col_tile).copy_(thread_col_sum.sum(0));
    if (symmetric) row_sum.narrow(0, col0, col_tile).add_(thread_col_sum.sum(0));
  });
  auto col_max = with_cols ? at::full({n_cols}, scale, opts) : at::empty({0}, opts);
  return {row_sum.log_().add_(scale), pos_logit, col_max, col_sum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lse_forward(
    const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos, const at::Tensor& excl,
    double scale, bool with_cols, bool keep) {
  check_inputs(rows, cols, pos, excl);
  const auto kept = kept_dots(rows, cols, keep);
  if (fixed_shift(rows, scale)) {
    const auto [row_lse, pos_logit, col_max, col_sum] = lse_forward_fixed_shift(
        rows, cols, pos.data_ptr<int64_t>(), excl.data_ptr<int64_t>(), scale, with_cols, kept);
    return {row_lse, pos_logit, col_max, col_sum, kept};
  }
  const int64_t n_rows = rows.size(0), n_cols = cols.size(0);
  const auto opts = rows.options();
  // Rows are unit (or zero) vectors, so every logit is >= -scale: a finite starting max that
  // keeps exp(old_max - new_max) well defined even for a row whose first tile is all masked.
  auto row_max = at::full({n_rows}, -scale, opts);
  auto row_sum = at::zeros({n_rows}, opts);
  auto pos_logit = at::zeros({n_rows}, opts);
  auto col_max = with_cols ? at::full({n_cols}, -scale, opts) : at::empty({0}, opts);
  auto col_sum = with_cols ? at::zeros({n_cols}, opts) : at::empty({0}, opts);

  const int64_t row_tile = row_tile_size(n_rows);
  const int64_t n_row_tiles = (n_rows + row_tile - 1) / row_tile;
  const int64_t n_threads = at::get_num_threads();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const int64_t* excl_ptr = excl.data_ptr<int64_t>();

  for_each_block(cols, kColTile, [&](int64_t col0, int64_t col_tile, const auto& col_block) {
    // Each thread merges the column statistics of its row tiles here; merged after the loop.
    auto thread_col_max = with_cols ? at::full({n_threads, col_tile}, -scale, opts) : at::Tensor();
    auto thread_col_sum = with_cols ? at::zeros({n_threads, col_tile}, opts) : at::Tensor();

    at::parallel_for(0, n_row_tiles, 1, [&](int64_t first, int64_t last) {
      const int64_t tid = at::get_thread_num();
      auto logits_buf = at::empty({row_tile, col_tile}, opts);
      auto exp_buf = at::empty({row_tile, col_tile}, opts);
      for (int64_t t = first; t < last; ++t) {
        const int64_t row0 = t * row_tile;
        const int64_t rows_here = std::min(row_tile, n_rows - row0);
        auto logits = logits_buf.narrow(0, 0, rows_here);
        auto exps = exp_buf.narrow(0, 0, rows_here);
        tile_dots(logits, kept, rows.narrow(0, row0, rows_here), row0, col0, col_block, false);
        scale_dots(logits, scale);
        AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "lse_forward_positives", [&] {
          const auto* data = logits.data_ptr<scalar_t>();
          auto* pos_out = pos_logit.data_ptr<scalar_t>();
          for (int64_t i = 0; i < rows_here; ++i) {
            const int64_t j = pos_ptr[row0 + i] - col0;
            if (j >= 0 && j < col_tile) pos_out[row0 + i] = data[i * col_tile + j];
          }
          mask_excluded<scalar_t>(logits, excl_ptr, row0, col0);
        });

        // Online row log-sum-exp: rescale the running sum to the new running max.
        auto run_max = row_max.narrow(0, row0, rows_here);
        auto run_sum = row_sum.narrow(0, row0, rows_here);
        auto new_max = at::maximum(run_max, at::amax(logits, 1));
        run_sum.mul_((run_max - new_max).exp_());
        at::sub_out(exps, logits, new_max.unsqueeze(1)).exp_();
        run_sum.add_(exps.sum(1));
        run_max.copy_(new_max);

        if (with_cols) {
          auto tile_col_max = at::amax(logits, 0).clamp_min_(-scale);
          at::sub_out(exps, logits, tile_col_max.unsqueeze(0)).exp_();
          auto tile_col_sum = exps.sum(0);
          auto acc_max = thread_col_max[tid];
          auto acc_sum = thread_col_sum[tid];
          auto merged = at::maximum(acc_max, tile_col_max);
          acc_sum.mul_((acc_max - merged).exp_()).add_(tile_col_sum * (tile_col_max - merged).exp_());
          acc_max.copy_(merged);
        }
      }
    });

    if (with_cols) {
      auto merged = at::amax(thread_col_max, 0);
      col_max.narrow(0, col0, col_tile).copy_(merged);
      col_sum.narrow(0, col0, col_tile)
          .copy_((thread_col_sum * (thread_col_max - merged.unsqueeze(0)).exp_()).sum(0));
    }
  });
  auto row_lse = row_max + row_sum.log();
  return {row_lse, pos_logit, col_max, col_sum, kept};
}

// An output the backward writes: n_rows x width in the working dtype with unit column stride (any
// row stride, so that it can be the first columns of the caller's N x D gradient).
void check_output(const at::Tensor& out, const at::Tensor& like, int64_t n_rows, const char* name) {
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n_rows && out.size(1) == like.size(1), name,
              " must be ", n_rows, " x ", like.size(1), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == like.scalar_type() && out.device().is_cpu(), name,
              " must be a CPU tensor in the working dtype");
  TORCH_CHECK(out.stride(1) == 1 && out.stride(0) >= out.size(1), name,
              " must have unit column stride and non-overlapping rows");
}

// The per-row (or per-column) factors of dL/dS in the working dtype: LSE, weight and, under the
// fixed shift, coef = w exp(scale - lse), so that P_ij w_i = exp(S_ij - scale) coef_i.
struct SoftmaxTerms {
  at::Tensor lse, weight, coef;
};

SoftmaxTerms softmax_terms(const at::Tensor& lse, const at::Tensor& w, const at::Tensor& like,
                           bool shifted, double scale) {
  SoftmaxTerms terms{lse.to(like.options()).contiguous(), w.to(like.options()).contiguous(), {}};
  if (shifted) terms.coef = (terms.weight * (scale - terms.lse).exp()).contiguous();
  return terms;
}

// One tile of G = dL/dS (rows row0.., columns col0..) into `grad` (contiguous) from its unit dot
// products `dots` (any row stride; masked in place under the fixed shift, else overwritten): G_ij = row_w_i (P^row_ij - [j = pos_i]) + col_w_j (P^col_ij - [j = pos_i]), the
// column term only where `col` is given.
void grad_tile(at::Tensor& dots, at::Tensor& grad, int64_t row0, int64_t col0, double scale,
               bool shifted, const SoftmaxTerms& row, const SoftmaxTerms* col,
               const int64_t* pos_ptr, const int64_t* excl_ptr) {
  const int64_t rows_here = dots.size(0), col_tile = dots.size(1);
  if (shifted) {
    mask_excluded<float>(dots, excl_ptr, row0, col0);
    const float* row_coef = row.coef.data_ptr<float>() + row0;
    const float shift = static_cast<float>(scale);
    (col ? shifted_grad_tile<true> : shifted_grad_tile<false>)(
        dots.data_ptr<float>(), dots.stride(0), grad.data_ptr<float>(), rows_here, col_tile,
        shift, row_coef, col ? col->coef.data_ptr<float>() + col0 : nullptr);
  } else {
    scale_dots(dots, scale);
    AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "lse_backward_mask", [&] {
      mask_excluded<scalar_t>(dots, excl_ptr, row0, col0);
    });
    // S - lse <= 0 exactly, but a recomputed S carries other roundings than the forward's
    // (other tiles; the mirror's dot product in ntxent), a few ulp of scale: from scale ~ 2^16
    // on that can exceed the LSE by enough to make P > 1, and inf near fp32's max (then
    // inf - inf = NaN). Clamped at 0: P <= 1 as it exactly is.
    at::sub_out(grad, dots, row.lse.narrow(0, row0, rows_here).unsqueeze(1))
        .clamp_max_(0.0)
        .exp_()
        .mul_(row.weight.narrow(0, row0, rows_here).unsqueeze(1));
    if (col) {
      dots.sub_(col->lse.narrow(0, col0, col_tile).unsqueeze(0))
          .clamp_max_(0.0)
          .exp_()
          .mul_(col->weight.narrow(0, col0, col_tile).unsqueeze(0));
      grad.add_(dots);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(dots.scalar_type(), "lse_backward_positives", [&] {
    auto* data = grad.data_ptr<scalar_t>();
    const auto* rw = row.weight.data_ptr<scalar_t>();
    const auto* cw = col ? col->weight.data_ptr<scalar_t>() : nullptr;
    for (int64_t i = 0; i < rows_here; ++i) {
      const int64_t p = pos_ptr[row0 + i];
      const int64_t j = p - col0;
      if (j >= 0 && j < col_tile) data[i * col_tile + j] -= rw[row0 + i] + (cw ? cw[p] : scalar_t(0));
    }
  });
}

// G tile by tile from the rows' and a column block's unit vectors, recomputed (or read from the
// forward's kept dots): what both backward kernels share. Each thread calls scratch() once per
// column block for its own buffers.
struct GradTiles {
  const at::Tensor& rows;
  const at::Tensor& kept;
  int64_t row_tile;
  double scale;
  bool shifted;
  const SoftmaxTerms& row_terms;
  const SoftmaxTerms* col_terms;
  const int64_t* pos_ptr;
  const int64_t* excl_ptr;

  struct Scratch {
    at::Tensor logits, grad;
  };
  Scratch scratch(int64_t col_tile) const {
    return {at::empty({row_tile, col_tile}, rows.options()),
            at::empty({row_tile, col_tile}, rows.options())};
  }
  // Row tile t against col_block (columns col0..): its rows and its G, in s's buffers.
  std::pair<at::Tensor, at::Tensor> operator()(Scratch& s, int64_t t, int64_t col0,
                                               const at::Tensor& col_block) const {
    const int64_t row0 = t * row_tile;
    const auto row_block = rows.narrow(0, row0, std::min(row_tile, rows.size(0) - row0));
    auto scratch = s.logits.narrow(0, 0, row_block.size(0));
    auto grad = s.grad.narrow(0, 0, row_block.size(0));
    at::Tensor logits = tile_dots(scratch, kept, row_block, row0, col0, col_block, shifted);
    grad_tile(logits, grad, row0, col0, scale, shifted, row_terms, col_terms, pos_ptr, excl_ptr);
    return {row_block, grad};
  }
};

// Row tiles on different threads all add into a column tile's gradient: one partial per thread.
// Narrower column tiles on many-core machines keep those partials under kMaxThreadPartials.
int64_t grad_col_tile_size(int64_t width) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>(kMaxThreadPartials / std::max<int64_t>(1, threads * width),
                             kMinColTile, kColTile);
}

// The forward's kept dots, if any, cover these rows and columns.
void check_kept(const at::Tensor& kept, const at::Tensor& rows, int64_t n_rows, int64_t n_cols) {
  if (kept.numel() == 0) return;
  TORCH_CHECK(kept.dim() == 2 && kept.size(0) == n_rows && kept.size(1) == n_cols &&
                  kept.is_contiguous() && kept.scalar_type() == rows.scalar_type(),
              "kept must be the forward's contiguous ", n_rows, " x ", n_cols,
              " dots in the working dtype, got ", kept.sizes());
}

// dL/dS as in grad_tile; the column term is present only when col_lse is non-empty. Writes dQ =
// scale G K into grad_rows and, if grad_cols has rows, dK = scale G^T Q into grad_cols (both
// overwritten, so they can be the caller's gradients themselves: no M x d copies). (ntxent over
// several processes passes its own row LSEs/weights as the column term and no grad_cols: S is
// symmetric and pos an involution, so G + G^T is exactly this G and dY = scale (G + G^T) Y is one
// product; on one process lse_backward_symmetric below also skips the mirror tiles.)
void lse_backward(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& pos,
                  const at::Tensor& excl, double scale, const at::Tensor& row_lse,
                  const at::Tensor& row_w, const at::Tensor& col_lse, const at::Tensor& col_w,
                  const at::Tensor& kept, at::Tensor grad_rows, at::Tensor grad_cols) {
  check_inputs(rows, cols, pos, excl);
  check_kept(kept, rows, rows.size(0), cols.size(0));
  const int64_t n_rows = rows.size(0), n_cols = cols.size(0), width = rows.size(1);
  const bool with_cols = col_lse.numel() > 0;
  const bool with_grad_cols = grad_cols.size(0) > 0;
  TORCH_CHECK(row_lse.numel() == n_rows && row_w.numel() == n_rows, "row_lse/row_w: one per row");
  TORCH_CHECK(!with_cols || (col_lse.numel() == n_cols && col_w.numel() == n_cols),
              "col_lse/col_w: one per column");
  check_output(grad_rows, rows, n_rows, "grad_rows");
  if (with_grad_cols) check_output(grad_cols, rows, n_cols, "grad_cols");
  const auto opts = rows.options();
  // grad_rows is accumulated over the column blocks, its first one written with beta 0 (nothing
  // to zero first); grad_cols is written once per block.
  if (n_cols == 0) grad_rows.zero_();
  const bool shifted = fixed_shift(rows, scale);
  const auto row_terms = softmax_terms(row_lse, row_w, rows, shifted, scale);
  const auto col_terms = with_cols ? softmax_terms(col_lse, col_w, rows, shifted, scale)
                                   : SoftmaxTerms{};
  const int64_t row_tile = row_tile_size(n_rows);
  const int64_t n_row_tiles = (n_rows + row_tile - 1) / row_tile;
  const int64_t n_threads = at::get_num_threads();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const int64_t* excl_ptr = excl.data_ptr<int64_t>();

  const GradTiles tiles{rows, kept, row_tile, scale, shifted, row_terms,
                        with_cols ? &col_terms : nullptr, pos_ptr, excl_ptr};

  const int64_t grad_col_tile = grad_col_tile_size(width);
  for_each_block(cols, grad_col_tile, [&](int64_t col0, int64_t col_tile, const auto& col_block) {
    // Each thread's partial is written with beta 0 by its first tile; one that got no tile is
    // zeroed after (no n_threads x col_tile x width fill before every block).
    auto thread_grad_cols =
        with_grad_cols ? at::empty({n_threads, col_tile, width}, opts) : at::Tensor();
    std::vector<uint8_t> thread_wrote(n_threads, 0);
    const double grad_rows_beta = col0 == 0 ? 0.0 : 1.0;

    at::parallel_for(0, n_row_tiles, 1, [&](int64_t first, int64_t last) {
      auto scratch = tiles.scratch(col_tile);
      const int64_t tid = at::get_thread_num();
      auto grad_cols_acc = with_grad_cols ? thread_grad_cols[tid] : at::Tensor();
      for (int64_t t = first; t < last; ++t) {
        const auto [row_block, grad_logits] = tiles(scratch, t, col0, col_block);
        auto grad_rows_here = grad_rows.narrow(0, t * row_tile, row_block.size(0));
        grad_rows_here.addmm_(grad_logits, col_block, grad_rows_beta, scale);
        if (with_grad_cols) {
          grad_cols_acc.addmm_(grad_logits.t(), row_block, thread_wrote[tid] ? 1.0 : 0.0, scale);
          thread_wrote[tid] = 1;
        }
      }
    });
    if (with_grad_cols) {
      for (int64_t tid = 0; tid < n_threads; ++tid) {
        if (!thread_wrote[tid]) thread_grad_cols[tid].zero_();
      }
      auto grad_cols_here = grad_cols.narrow(0, col0, col_tile);
      at::sum_out(grad_cols_here, thread_grad_cols, 0);
    }
  });
}

// Rows [row0, row0 + count) of the outputs taken as one tall matrix (consecutive row blocks, e.g.
// the two views' gradients): calls fn(piece of an output, offset of the piece within the range).
template <typename Fn>
void for_each_piece(at::TensorList blocks, int64_t row0, int64_t count, Fn&& fn) {
  int64_t block_start = 0;
  for (const auto& block : blocks) {
    const int64_t begin = std::max(row0, block_start);
    const int64_t end = std::min(row0 + count, block_start + block.size(0));
    if (begin < end) fn(block.narrow(0, begin - block_start, end - begin), begin - row0);
    block_start += block.size(0);
  }
}

// ntxent on one process: the columns are the rows themselves, the excluded entries the diagonal,
// the column terms the row terms, and pos an involution, so G is symmetric and dY = scale G Y.
// Only the row tiles that start before each column block ends are computed (as the forward); one
// wholly before the block (a mirror tile) adds G Y[block] to its own rows and G^T Y[its rows] to
// the block's rows (per-thread partials, added after the block in a fixed order). About 3/4 of
// the full sweep's products and half its exponentials. Writes the gradient into grad_blocks,
// consecutive row blocks covering the rows (one per view; any row stride).
void lse_backward_symmetric(const at::Tensor& rows, const at::Tensor& pos, double scale,
                            const at::Tensor& lse, const at::Tensor& w, const at::Tensor& kept,
                            at::TensorList grad_blocks) {
  const int64_t n_rows = rows.size(0), width = rows.size(1);
  const auto diagonal = at::arange(n_rows, pos.options());
  check_inputs(rows, rows, pos, diagonal);
  check_kept(kept, rows, n_rows, n_rows);
  TORCH_CHECK(lse.numel() == n_rows && w.numel() == n_rows, "lse/w: one per row");
  int64_t covered = 0;
  for (const auto& block : grad_blocks) {
    TORCH_CHECK(block.dim() == 2, "grad_blocks must be 2-D");
    check_output(block, rows, block.size(0), "each of grad_blocks");
    covered += block.size(0);
  }
  TORCH_CHECK(covered == n_rows, "grad_blocks must cover the ", n_rows, " rows, got ", covered);
  const auto opts = rows.options();
  for (const auto& block : grad_blocks) block.zero_();
  const bool shifted = fixed_shift(rows, scale);
  const auto terms = softmax_terms(lse, w, rows, shifted, scale);
  const int64_t col_tile_max = power_of_two_floor(grad_col_tile_size(width));
  const int64_t row_tile = symmetric_row_tile(n_rows, col_tile_max);
  const int64_t n_row_tiles = (n_rows + row_tile - 1) / row_tile;
  const int64_t n_threads = at::get_num_threads();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const int64_t* excl_ptr = diagonal.data_ptr<int64_t>();

  const GradTiles tiles{rows, kept, row_tile, scale, shifted, terms, &terms, pos_ptr, excl_ptr};

  for_each_block(rows, col_tile_max, [&](int64_t col0, int64_t col_tile, const auto& col_block) {
    const int64_t tiles_here = row_tiles_before_end(n_row_tiles, row_tile, col0 + col_tile);
    auto thread_mirror = at::zeros({n_threads, col_tile, width}, opts);
    at::parallel_for(0, tiles_here, 1, [&](int64_t first, int64_t last) {
      auto scratch = tiles.scratch(col_tile);
      auto mirror_acc = thread_mirror[at::get_thread_num()];
      for (int64_t t = first; t < last; ++t) {
        const auto [row_block, grad_logits] = tiles(scratch, t, col0, col_block);
        const int64_t row0 = t * row_tile, rows_here = row_block.size(0);
        for_each_piece(grad_blocks, row0, rows_here, [&](at::Tensor out, int64_t offset) {
          out.addmm_(grad_logits.narrow(0, offset, out.size(0)), col_block, 1.0, scale);
        });
        if (row0 + rows_here <= col0) mirror_acc.addmm_(grad_logits.t(), row_block, 1.0, scale);
      }
    });
    const auto mirror = thread_mirror.sum(0);
    for_each_piece(grad_blocks, col0, col_tile, [&](at::Tensor out, int64_t offset) {
      out.add_(mirror.narrow(0, offset, out.size(0)));
    });
  });
}

}  // namespace

TORCH_LIBRARY(directclr_cpu, m) {
  m.def(
      "lse_forward(Tensor rows, Tensor cols, Tensor pos, Tensor excl, float scale, bool with_cols,"
      " bool keep) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "lse_backward(Tensor rows, Tensor cols, Tensor pos, Tensor excl, float scale, Tensor row_lse,"
      " Tensor row_w, Tensor col_lse, Tensor col_w, Tensor kept, Tensor(a!) grad_rows,"
      " Tensor(b!) grad_cols)"
      " -> ()");
  m.def(
      "lse_backward_symmetric(Tensor rows, Tensor pos, float scale, Tensor lse, Tensor w,"
      " Tensor kept, Tensor(a!)[] grad_blocks) -> ()");
  m.impl("lse_forward", c10::DispatchKey::CPU, TORCH_FN(lse_forward));
  m.impl("lse_backward", c10::DispatchKey::CPU, TORCH_FN(lse_backward));
  m.impl("lse_backward_symmetric", c10::DispatchKey::CPU, TORCH_FN(lse_backward_symmetric));
}

}  // namespace directclr
