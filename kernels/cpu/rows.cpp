// Per-row work around the InfoNCE primitive (infonce.cpp), each in one pass over the rows: the
// prologue that turns both views' embeddings into unit subvectors, and the epilogue that turns
// the gradient w.r.t. those unit rows into the gradient w.r.t. z. In plain PyTorch they are a
// dozen elementwise ops and reductions each (directclr/rows.py, the same formulas): at the batch
// sizes people train with per process (N = 256-4096) those passes cost as much as a matrix
// product of the loss, and their temporaries as many page faults.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>

namespace directclr {
namespace {

constexpr int kHighExponent = 16;  // directclr/scaling.py HIGH: rows with max |x| >= 2^16 scale
constexpr double kNormEps = 1e-12;  // directclr/rows.py NORM_EPS, F.normalize's floor
// Rows per parallel task: below 2 x 256 rows one thread does it all (waking another costs more).
constexpr int64_t kRowGrain = 256;
constexpr int kLanes = 16;          // independent partial results: the row loops vectorize

// s of scaling.power_of_two_scale(scale_up=False): 2^(e - 16) for max |x| = m 2^e (m in [1/2,
// 1)) with e > 16, else 1 (zero, small and non-finite maxima: their rows keep their values).
template <typename work_t>
work_t power_of_two_scale(work_t maxabs) {
  if (!std::isfinite(maxabs)) return 1;
  int exponent = 0;
  std::frexp(maxabs, &exponent);
  return exponent > kHighExponent ? std::ldexp(work_t(1), exponent - kHighExponent) : work_t(1);
}

// z's row -> v, `dim` wide and contiguous, in the working dtype.
template <typename in_t, typename work_t>
void load_row(const in_t* x, int64_t col_stride, int64_t dim, work_t* v) {
  if (col_stride == 1) {
    for (int64_t k = 0; k < dim; ++k) v[k] = static_cast<work_t>(x[k]);
  } else {
    for (int64_t k = 0; k < dim; ++k) v[k] = static_cast<work_t>(x[k * col_stride]);
  }
}

// |v|^2, accumulated in double in kLanes partial sums (a loop GCC vectorizes; a max-|v| loop it
// leaves scalar).
template <typename work_t>
double squared_norm(const work_t* v, int64_t dim) {
  double lane_sum[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= dim; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lane_sum[l] += static_cast<double>(v[k + l]) * static_cast<double>(v[k + l]);
    }
  }
  double total = 0;
  for (; k < dim; ++k) total += static_cast<double>(v[k]) * static_cast<double>(v[k]);
  for (int l = 0; l < kLanes; ++l) total += lane_sum[l];
  return total;
}

// Every |v_k| is below 2^16 where |v|^2 is below 2^32: then s = 1 without a max. Else (huge rows,
// non-finite ones, float64 sums past double's range) max |v| decides s, and v is divided by it.
template <typename work_t>
work_t scale_row(work_t* v, int64_t dim, double& squared) {
  if (squared < 0x1p32) return 1;
  work_t maxabs = 0;
  for (int64_t k = 0; k < dim; ++k) maxabs = std::max(maxabs, std::abs(v[k]));  // skips NaN
  const work_t s = power_of_two_scale(maxabs);
  if (s != 1) {
    const work_t inv_s = work_t(1) / s;  // exact: a power of two
    for (int64_t k = 0; k < dim; ++k) v[k] *= inv_s;
    squared = squared_norm(v, dim);
  }
  return s;
}

// Rows 0..N-1 of the outputs from z1, N..2N-1 from z2, in one parallel pass.
template <typename in_t, typename work_t>
void unit_rows(const at::Tensor& z1, const at::Tensor& z2, int64_t dim, work_t* sub,
               work_t* inv_norm, work_t* inv_grad, work_t* scale) {
  const int64_t n = z1.size(0);
  at::parallel_for(0, 2 * n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const at::Tensor& z = row < n ? z1 : z2;
      const int64_t i = row < n ? row : row - n;
      work_t* v = sub + row * dim;
      load_row(z.const_data_ptr<in_t>() + i * z.stride(0), z.stride(1), dim, v);
      double squared = squared_norm(v, dim);
      const work_t s = scale_row(v, dim, squared);
      const work_t norm = static_cast<work_t>(std::sqrt(squared));
      const work_t inv = work_t(1) / std::max(norm, static_cast<work_t>(kNormEps));
      for (int64_t k = 0; k < dim; ++k) v[k] *= inv;
      inv_norm[row] = inv;
      // The norm has no derivative at 0: rows under the floor get a zero gradient.
      inv_grad[row] = norm >= static_cast<work_t>(kNormEps) ? inv : work_t(0);
      scale[row] = s;
    }
  });
}

void check_views(const at::Tensor& z1, const at::Tensor& z2, int64_t dim) {
  TORCH_CHECK(z1.dim() == 2 && z2.dim() == 2 && z1.sizes() == z2.sizes(),
              "z1 and z2 must be 2-D of one shape");
  TORCH_CHECK(z1.scalar_type() == z2.scalar_type(), "z1 and z2 must share a dtype");
  TORCH_CHECK(z1.device().is_cpu() && z2.device().is_cpu(), "CPU kernel got a non-CPU tensor");
  TORCH_CHECK(dim >= 1 && dim <= z1.size(1), "dim must be in [1, ", z1.size(1), "], got ", dim);
}

// Both views' unit subvectors (2N x dim, z1's rows then z2's, in the working dtype: float64 for
// float64 input, else float32), 1 / max(|v|, eps), the backward's 1/|v| (0 under the floor) and
// the power of two s of each row (directclr/rows.py subvectors(unit=True)).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unit_subvectors(const at::Tensor& z1,
                                                                           const at::Tensor& z2,
                                                                           int64_t dim) {
  check_views(z1, z2, dim);
  const int64_t n = z1.size(0);
  const auto work = z1.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z1.options().dtype(work);
  auto sub = at::empty({2 * n, dim}, opts);
  auto inv_norm = at::empty({2 * n}, opts), inv_grad = at::empty({2 * n}, opts);
  auto scale = at::empty({2 * n}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "unit_subvectors", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(work, "unit_subvectors_work", [&] {
      unit_rows<in_t, scalar_t>(z1, z2, dim, sub.data_ptr<scalar_t>(),
                                inv_norm.data_ptr<scalar_t>(), inv_grad.data_ptr<scalar_t>(),
                                scale.data_ptr<scalar_t>());
    });
  });
  return {sub, inv_norm, inv_grad, scale};
}

// sum_k g_k u_k in the working dtype, in kLanes partial sums.
template <typename work_t>
work_t row_dot(const work_t* g, const work_t* u, int64_t dim) {
  work_t lane_sum[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= dim; k += kLanes) {
    for (int l = 0; l < kLanes; ++l) lane_sum[l] += g[k + l] * u[k + l];
  }
  work_t total = 0;
  for (; k < dim; ++k) total += g[k] * u[k];
  for (int l = 0; l < kLanes; ++l) total += lane_sum[l];
  return total;
}

// The gradient w.r.t. one view's z from the one w.r.t. its unit rows u = v / |v| (v = u_z / s):
// z_grad[i, :dim] = (g_i - u_i (u_i . g_i)) * inv_grad_i / divisor_i (the radial part removed,
// 1/|v|, then the row's power of two and the weights' 2^-k undone last: for a huge row the
// quotient is the tiny gradient itself), z_grad[i, dim:] = 0. grad_unit may be z_grad's own
// first columns (each row is read before it is written). Returns u_i . g_i per row, from which
// the temperature's gradient comes (directclr/fused.py backward).
template <typename out_t, typename work_t>
void finish_rows_kernel(const at::Tensor& grad_unit, const work_t* unit, const work_t* inv_grad,
                        const work_t* divisor, at::Tensor& z_grad, work_t* radial) {
  const int64_t n = z_grad.size(0), width = z_grad.size(1), dim = grad_unit.size(1);
  const int64_t grad_stride = grad_unit.stride(0), out_stride = z_grad.stride(0);
  const work_t* grad_base = grad_unit.data_ptr<work_t>();
  out_t* out_base = z_grad.data_ptr<out_t>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const work_t* g = grad_base + i * grad_stride;
      const work_t* u = unit + i * dim;
      out_t* out = out_base + i * out_stride;
      const work_t along = row_dot(g, u, dim);
      const work_t factor = inv_grad[i], d = divisor[i];
      for (int64_t k = 0; k < dim; ++k) out[k] = static_cast<out_t>((g[k] - u[k] * along) * factor / d);
      std::fill(out + dim, out + width, out_t(0));
      radial[i] = along;
    }
  });
}

at::Tensor finish_rows(const at::Tensor& grad_unit, const at::Tensor& unit, const at::Tensor& inv_grad,
                       const at::Tensor& divisor, at::Tensor z_grad) {
  const int64_t n = unit.size(0);
  TORCH_CHECK(unit.dim() == 2 && unit.is_contiguous(), "unit must be 2-D and contiguous");
  TORCH_CHECK(grad_unit.dim() == 2 && grad_unit.sizes() == unit.sizes() && grad_unit.stride(1) == 1,
              "grad_unit must be unit's shape with unit column stride");
  TORCH_CHECK(grad_unit.scalar_type() == unit.scalar_type() &&
                  inv_grad.scalar_type() == unit.scalar_type() &&
                  divisor.scalar_type() == unit.scalar_type(),
              "grad_unit, unit, inv_grad and divisor must share the working dtype");
  TORCH_CHECK(unit.scalar_type() == at::kFloat || unit.scalar_type() == at::kDouble,
              "the working dtype must be float32 or float64");
  TORCH_CHECK(inv_grad.numel() == n && divisor.numel() == n && inv_grad.is_contiguous() &&
                  divisor.is_contiguous(),
              "inv_grad and divisor need one contiguous entry per row");
  TORCH_CHECK(z_grad.dim() == 2 && z_grad.size(0) == n && z_grad.size(1) >= unit.size(1) &&
                  z_grad.stride(1) == 1,
              "z_grad must be N x D (D >= dim) with unit column stride");
  TORCH_CHECK(grad_unit.device().is_cpu() && z_grad.device().is_cpu(), "CPU kernel got a non-CPU tensor");
  auto radial = at::empty({n}, unit.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z_grad.scalar_type(), "finish_rows", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(unit.scalar_type(), "finish_rows_work", [&] {
      finish_rows_kernel<out_t, scalar_t>(grad_unit, unit.data_ptr<scalar_t>(),
                                          inv_grad.data_ptr<scalar_t>(), divisor.data_ptr<scalar_t>(),
                                          z_grad, radial.data_ptr<scalar_t>());
    });
  });
  return radial;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(directclr_cpu, m) {
  m.def("unit_subvectors(Tensor z1, Tensor z2, int dim) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "finish_rows(Tensor grad_unit, Tensor unit, Tensor inv_grad, Tensor divisor,"
      " Tensor(a!) z_grad) -> Tensor");
  m.impl("unit_subvectors", c10::DispatchKey::CPU, TORCH_FN(unit_subvectors));
  m.impl("finish_rows", c10::DispatchKey::CPU, TORCH_FN(finish_rows));
}

}  // namespace directclr
