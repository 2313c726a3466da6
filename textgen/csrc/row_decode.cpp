// One GPT-2 decode step for a single sequence on a CPU with AVX-512 BF16, bfloat16 weights.
//
// At one row every projection is a matrix-vector product: the step reads all the weights
// once and is bound by memory bandwidth. oneDNN's bf16 GEMV reads them at ~20 GB/s here;
// this one, over a blocked layout, at ~26 GB/s, the rate a plain streaming sum reaches. The
// rest of the layer (layer norms, the cache write, attention over one query, GELU, residual
// adds) runs in the same call, so a layer costs one dispatch instead of ~20.
//
// Numerics follow the runner's bf16 path (textgen/runner.py): the residual stream,
// layer-norm outputs, attention output and GELU output are rounded to bfloat16; projections
// accumulate in float32; the KV cache and attention are float32.
//
// Blocked weight layout: a projection W (N, K) (nn.Linear's layout) is stored as `blocks`
// (N / 8, K / 32, 8, 32): for each group of 8 output rows, each 32-wide slice of K holds
// the 8 rows' slices one after another, so one group streams as one contiguous run. The
// N % 8 rows left over are `tail` (N % 8, K), row-major. K % 32 == 0.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kRows = 8;   // output rows per group
constexpr int64_t kSlice = 32;  // bf16 elements per 512-bit register
constexpr int64_t kPrefetch = 2048;  // elements ahead of the read, within the group's run

// out[r] = W[r] . x for kRows rows of one group; `w` points at the group's blocks.
inline void group_dot(const bf16* w, const bf16* x, int64_t k_size, float* out) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += kSlice) {
    const bf16* run = w + k * kRows;
    _mm_prefetch(reinterpret_cast<const char*>(run + kPrefetch), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(run + kPrefetch + 4 * kSlice), _MM_HINT_T0);
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(run + r * kSlice);
      acc[r] = _mm512_dpbf16_ps(acc[r], wv, xv);
    }
  }
  for (int r = 0; r < kRows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

inline float row_dot(const bf16* w, const bf16* x, int64_t k_size) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; k += kSlice) {
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k),
                           (__m512bh)_mm512_loadu_si512(x + k));
  }
  return _mm512_reduce_add_ps(acc);
}

// exp for the GELU's sigmoid; Cephes' expf polynomial, scaled by 2^n. Inputs are clamped
// to +-88.7 (exp stays finite); a NaN input gives NaN.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(88.7f), x);
  x = _mm512_max_ps(_mm512_set1_ps(-88.7f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// tanh GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as
// x / (1 + exp(-2u)) (the same function).
inline __m512 gelu_tanh_ps(__m512 x) {
  const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
  const __m512 e = exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
  return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.0f + std::tanh(u));
}

enum class Epilogue { kNone, kGelu };

// y[n] = W[n] . x + bias[n] for n < N, then the epilogue; y float32 (N,).
void gemv(const at::Tensor& blocks, const at::Tensor& tail, const at::Tensor& bias,
          const bf16* x, float* y, Epilogue epilogue) {
  const int64_t groups = blocks.size(0), k_size = blocks.size(1) * kSlice;
  const bf16* w = blocks.data_ptr<bf16>();
  const bf16* b = bias.defined() ? bias.data_ptr<bf16>() : nullptr;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      group_dot(w + g * k_size * kRows, x, k_size, y + g * kRows);
    }
    const int64_t lo = begin * kRows, hi = end * kRows;
    if (b != nullptr) {
      for (int64_t n = lo; n < hi; ++n) y[n] += static_cast<float>(b[n]);
    }
    if (epilogue == Epilogue::kGelu) {
      int64_t n = lo;
      for (; n + 16 <= hi; n += 16) {
        _mm512_storeu_ps(y + n, gelu_tanh_ps(_mm512_loadu_ps(y + n)));
      }
      for (; n < hi; ++n) y[n] = gelu_tanh(y[n]);
    }
  });
  const int64_t done = groups * kRows;
  for (int64_t r = 0; r < tail.size(0); ++r) {
    float v = row_dot(tail.data_ptr<bf16>() + r * k_size, x, k_size);
    if (b != nullptr) v += static_cast<float>(b[done + r]);
    y[done + r] = epilogue == Epilogue::kGelu ? gelu_tanh(v) : v;
  }
}

// out = bf16(layer_norm(x)) over C elements, statistics in float32 as torch computes them.
void layer_norm(const bf16* x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                int64_t c, bf16* out) {
  const bf16* w = weight.data_ptr<bf16>();
  const bf16* b = bias.data_ptr<bf16>();
  float mean = 0.0f;
  for (int64_t i = 0; i < c; ++i) mean += static_cast<float>(x[i]);
  mean /= c;
  float var = 0.0f;
  for (int64_t i = 0; i < c; ++i) {
    const float d = static_cast<float>(x[i]) - mean;
    var += d * d;
  }
  const float rstd = 1.0f / std::sqrt(var / c + static_cast<float>(eps));
  for (int64_t i = 0; i < c; ++i) {
    const float v = (static_cast<float>(x[i]) - mean) * rstd;
    out[i] = bf16(v * static_cast<float>(w[i]) + static_cast<float>(b[i]));
  }
}

void check_blocked(const at::Tensor& blocks, const at::Tensor& tail, int64_t k) {
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == kRows && blocks.size(3) == kSlice &&
                  blocks.size(1) * kSlice == k && blocks.is_contiguous() &&
                  blocks.scalar_type() == at::kBFloat16,
              "row_decode: a projection's blocks must be (N/8, K/32, 8, 32) bfloat16 with K=", k);
  TORCH_CHECK(tail.dim() == 2 && tail.size(0) < kRows && tail.size(1) == k &&
                  tail.is_contiguous() && tail.scalar_type() == at::kBFloat16,
              "row_decode: a projection's tail must be (N % 8, K) bfloat16");
}

int64_t out_size(const at::Tensor& blocks, const at::Tensor& tail) {
  return blocks.size(0) * kRows + tail.size(0);
}

// One transformer block for one sequence. x: residual stream (C,) bfloat16, updated in
// place. kv: this layer's cache (2, S, H, T, D) float32; the sequence's key and value are
// written at [:, slot, :, pos] and it attends to positions 0..pos of its slot.
// w: ln_1 weight, bias; qkv blocks, tail, bias; attn_out blocks, tail, bias; ln_2 weight,
// bias; fc blocks, tail, bias; mlp_out blocks, tail, bias (16 tensors).
void block(at::Tensor x, at::TensorList w, at::Tensor kv, int64_t slot, int64_t pos,
           double scale, double eps) {
  TORCH_CHECK(w.size() == 16, "row_decode.block takes 16 weight tensors");
  const int64_t c = x.size(0), heads = kv.size(2), t = kv.size(3), d = kv.size(4);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: (C,) bfloat16");
  TORCH_CHECK(kv.is_contiguous() && kv.scalar_type() == at::kFloat && heads * d == c,
              "kv: (2, S, H, T, D) float32 with H * D = C");
  TORCH_CHECK(slot >= 0 && slot < kv.size(1) && pos >= 0 && pos < t, "slot or pos out of range");
  TORCH_CHECK(d % 16 == 0, "row_decode: head size must be a multiple of 16");
  check_blocked(w[2], w[3], c);
  check_blocked(w[5], w[6], c);
  check_blocked(w[10], w[11], c);
  check_blocked(w[13], w[14], out_size(w[10], w[11]));
  TORCH_CHECK(out_size(w[2], w[3]) == 3 * c && out_size(w[5], w[6]) == c &&
                  out_size(w[13], w[14]) == c,
              "row_decode: projection sizes don't match C");
  const int64_t hidden = out_size(w[10], w[11]);

  bf16* xs = x.data_ptr<bf16>();
  std::vector<bf16> normed(std::max(c, hidden));
  std::vector<float> y(std::max(3 * c, hidden));

  // Attention: q, k, v = split(ln_1(x) W_qkv + b); the cache takes k and v at pos.
  layer_norm(xs, w[0], w[1], eps, c, normed.data());
  gemv(w[2], w[3], w[4], normed.data(), y.data(), Epilogue::kNone);
  float* cache = kv.data_ptr<float>();
  const int64_t head_stride = t * d, slot_stride = heads * head_stride;
  float* keys = cache + slot * slot_stride;                     // (H, T, D)
  float* values = cache + (kv.size(1) + slot) * slot_stride;     // (H, T, D)
  for (int64_t h = 0; h < heads; ++h) {
    std::copy_n(y.data() + c + h * d, d, keys + h * head_stride + pos * d);
    std::copy_n(y.data() + 2 * c + h * d, d, values + h * head_stride + pos * d);
  }
  std::vector<float> attended(c);
  const int64_t length = pos + 1;
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t h = begin; h < end; ++h) {
      const float* q = y.data() + h * d;
      const float* k = keys + h * head_stride;
      const float* v = values + h * head_stride;
      float top = -INFINITY;
      for (int64_t l = 0; l < length; ++l) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + l * d + i), acc);
        }
        scores[l] = _mm512_reduce_add_ps(acc) * static_cast<float>(scale);
        top = std::max(top, scores[l]);
      }
      float total = 0.0f;
      for (int64_t l = 0; l < length; ++l) {
        scores[l] = std::exp(scores[l] - top);
        total += scores[l];
      }
      float* out = attended.data() + h * d;
      for (int64_t i = 0; i < d; i += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t l = 0; l < length; ++l) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[l]), _mm512_loadu_ps(v + l * d + i), acc);
        }
        _mm512_storeu_ps(out + i, _mm512_div_ps(acc, _mm512_set1_ps(total)));
      }
    }
  });

  // x = bf16(x + bf16(attended) W_o + b)
  for (int64_t i = 0; i < c; ++i) normed[i] = bf16(attended[i]);
  gemv(w[5], w[6], w[7], normed.data(), y.data(), Epilogue::kNone);
  for (int64_t i = 0; i < c; ++i) xs[i] = bf16(static_cast<float>(xs[i]) + y[i]);

  // x = bf16(x + bf16(gelu(ln_2(x) W_fc + b)) W_out + b)
  layer_norm(xs, w[8], w[9], eps, c, normed.data());
  gemv(w[10], w[11], w[12], normed.data(), y.data(), Epilogue::kGelu);
  std::vector<bf16> activated(hidden);
  for (int64_t i = 0; i < hidden; ++i) activated[i] = bf16(y[i]);
  gemv(w[13], w[14], w[15], activated.data(), y.data(), Epilogue::kNone);
  for (int64_t i = 0; i < c; ++i) xs[i] = bf16(static_cast<float>(xs[i]) + y[i]);
}

// Next-token logits (V,) float32 = ln_f(x) W_head^T, no bias.
at::Tensor head(at::Tensor x, at::Tensor ln_weight, at::Tensor ln_bias, double eps,
                at::Tensor blocks, at::Tensor tail) {
  const int64_t c = x.size(0);
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: (C,) bfloat16");
  check_blocked(blocks, tail, c);
  std::vector<bf16> normed(c);
  layer_norm(x.data_ptr<bf16>(), ln_weight, ln_bias, eps, c, normed.data());
  at::Tensor logits = at::empty({out_size(blocks, tail)}, x.options().dtype(at::kFloat));
  gemv(blocks, tail, at::Tensor(), normed.data(), logits.data_ptr<float>(), Epilogue::kNone);
  return logits;
}

}  // namespace

TORCH_LIBRARY(textgen_row, m) {
  m.def("block(Tensor(a!) x, Tensor[] w, Tensor(b!) kv, int slot, int pos, float scale, "
        "float eps) -> ()");
  m.def("head(Tensor x, Tensor ln_weight, Tensor ln_bias, float eps, Tensor blocks, "
        "Tensor tail) -> Tensor");
}

TORCH_LIBRARY_IMPL(textgen_row, CPU, m) {
  m.impl("block", &block);
  m.impl("head", &head);
}
