// One GPT-2 decode step for a single sequence on a CPU with AVX-512 (BF16, VNNI), in two
// weight precisions: bfloat16 and int8.
//
// At one row every projection is a matrix-vector product: the step reads all the weights
// once and is bound by memory bandwidth. oneDNN's bf16 GEMV reads them at ~20 GB/s here;
// these, over a blocked layout, at ~26 GB/s, the rate a plain streaming sum reaches. The
// rest of the layer (layer norms, the cache write, attention over one query, GELU, residual
// adds) runs in the same call, so a layer costs one dispatch instead of ~20.
//
// bfloat16 follows the runner's oneDNN path (textgen/runner.py): the residual stream,
// layer-norm outputs, attention output and GELU output are rounded to bfloat16; projections
// accumulate in float32. Two roundings of that path are left out: q, k, v and the logits
// stay float32 here (oneDNN rounds them to bfloat16), so the keys and values written into
// the cache carry more precision than the batched path's. int8 keeps activations in float32, as the runner's int8 path does;
// each projection quantizes its input row to uint8 (asymmetric, one scale for the row, the
// full 0..255 range) and its weights are int8 with one symmetric scale per output row. The
// KV cache and attention are float32 in both.
//
// Blocked weight layout: a projection W (N, K) (nn.Linear's layout) is stored as `blocks`
// (N / 8, K / S, 8, S): for each group of 8 output rows, each S-wide slice of K holds the 8
// rows' slices one after another, so one group streams as one contiguous run. S is 32
// bfloat16 or 64 int8 (one 512-bit register). The N % 8 rows left over are `tail`
// (N % 8, K), row-major. K % S == 0.

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using bf16 = c10::BFloat16;
constexpr int64_t kRows = 8;         // output rows per group
constexpr int64_t kLineBytes = 64;   // one 512-bit register, one cache line
constexpr int64_t kPrefetch = 4096;  // bytes ahead of the read: the rest of the group's run,
                                     // then the next group's (past the end: ignored)

enum class Epilogue { kNone, kGelu };

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

// Applies bias (float32 or bfloat16, may be absent) and the epilogue to y[lo, hi).
template <class B>
void finish(const B* bias, float* y, int64_t lo, int64_t hi, Epilogue epilogue) {
  if (bias != nullptr) {
    for (int64_t n = lo; n < hi; ++n) y[n] += static_cast<float>(bias[n]);
  }
  if (epilogue == Epilogue::kGelu) {
    int64_t n = lo;
    for (; n + 16 <= hi; n += 16) {
      _mm512_storeu_ps(y + n, gelu_tanh_ps(_mm512_loadu_ps(y + n)));
    }
    for (; n < hi; ++n) y[n] = gelu_tanh(y[n]);
  }
}

// ---- bfloat16 weights: y = W x (+ bias), x bfloat16, products accumulated in float32 ----
struct Bf16 {
  using Act = bf16;  // what the residual stream and a projection's input are
  static constexpr int64_t kSlice = kLineBytes / 2;
  static constexpr int kTensors = 3;  // blocks, tail, bias
  static constexpr c10::ScalarType kWeight = at::kBFloat16;

  static Act store(float v) { return bf16(v); }

  // out[r] = W[r] . x for the kRows rows of one group; `w` points at the group's run.
  static void group_dot(const bf16* w, const bf16* x, int64_t k_size, float* out) {
    __m512 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_size; k += kSlice) {
      const bf16* run = w + k * kRows;
      _mm_prefetch(reinterpret_cast<const char*>(run) + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(run) + kPrefetch + 4 * kLineBytes, _MM_HINT_T0);
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
      for (int r = 0; r < kRows; ++r) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(run + r * kSlice);
        acc[r] = _mm512_dpbf16_ps(acc[r], wv, xv);
      }
    }
    for (int r = 0; r < kRows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
  }

  static float row_dot(const bf16* w, const bf16* x, int64_t k_size) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < k_size; k += kSlice) {
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w + k),
                             (__m512bh)_mm512_loadu_si512(x + k));
    }
    return _mm512_reduce_add_ps(acc);
  }

  // y (N,) float32 = W x + bias, then the epilogue. w: blocks, tail, bias (empty: none).
  static void gemv(const at::Tensor* w, const Act* x, float* y, Epilogue epilogue) {
    const at::Tensor &blocks = w[0], &tail = w[1], &bias = w[2];
    const int64_t groups = blocks.size(0), k_size = blocks.size(1) * kSlice;
    const bf16* weights = blocks.data_ptr<bf16>();
    const bf16* b = bias.numel() > 0 ? bias.data_ptr<bf16>() : nullptr;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        group_dot(weights + g * k_size * kRows, x, k_size, y + g * kRows);
      }
      finish(b, y, begin * kRows, end * kRows, epilogue);
    });
    const int64_t done = groups * kRows;
    for (int64_t r = 0; r < tail.size(0); ++r) {
      y[done + r] = row_dot(tail.data_ptr<bf16>() + r * k_size, x, k_size);
    }
    finish(b, y, done, done + tail.size(0), epilogue);
  }
};

// ---- int8 weights: y = s_x s_w[n] (W_q[n] . (x_q - z_x)) (+ bias), x quantized here ----
struct Int8 {
  using Act = float;
  static constexpr int64_t kSlice = kLineBytes;
  static constexpr int kTensors = 5;  // blocks, tail, scales (N,) f32, sums (N,) i32, bias
  static constexpr c10::ScalarType kWeight = at::kChar;

  static Act store(float v) { return v; }

  static void group_dot(const int8_t* w, const uint8_t* x, int64_t k_size, int32_t* out) {
    __m512i acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < k_size; k += kSlice) {
      const int8_t* run = w + k * kRows;
      _mm_prefetch(reinterpret_cast<const char*>(run) + kPrefetch, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(run) + kPrefetch + 4 * kLineBytes, _MM_HINT_T0);
      const __m512i xv = _mm512_loadu_si512(x + k);
      for (int r = 0; r < kRows; ++r) {
        acc[r] = _mm512_dpbusd_epi32(acc[r], xv, _mm512_loadu_si512(run + r * kSlice));
      }
    }
    for (int r = 0; r < kRows; ++r) out[r] = _mm512_reduce_add_epi32(acc[r]);
  }

  static int32_t row_dot(const int8_t* w, const uint8_t* x, int64_t k_size) {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t k = 0; k < k_size; k += kSlice) {
      acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(x + k), _mm512_loadu_si512(w + k));
    }
    return _mm512_reduce_add_epi32(acc);
  }

  static void gemv(const at::Tensor* w, const Act* x, float* y, Epilogue epilogue) {
    const at::Tensor &blocks = w[0], &tail = w[1], &scales = w[2], &sums = w[3], &bias = w[4];
    const int64_t groups = blocks.size(0), k_size = blocks.size(1) * kSlice;
    const int64_t n_size = groups * kRows + tail.size(0);
    // x's range, 0 included; a NaN or infinity makes every output NaN, as float math would.
    float low = 0.0f, high = 0.0f;
    bool finite = true;
    for (int64_t k = 0; k < k_size; ++k) {
      finite = finite && std::isfinite(x[k]);
      low = std::min(low, x[k]);
      high = std::max(high, x[k]);
    }
    if (!finite) {
      std::fill_n(y, n_size, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    // At least the smallest normal float: an all-subnormal row must not divide by zero.
    const float scale =
        high > low ? std::max((high - low) / 255.0f, std::numeric_limits<float>::min()) : 1.0f;
    const int32_t zero = static_cast<int32_t>(std::nearbyint(-low / scale));  // in 0..255
    std::vector<uint8_t> xq(k_size);
    for (int64_t k = 0; k < k_size; ++k) {
      const float q = std::nearbyint(x[k] / scale) + static_cast<float>(zero);
      xq[k] = static_cast<uint8_t>(std::clamp(q, 0.0f, 255.0f));
    }
    const int8_t* weights = blocks.data_ptr<int8_t>();
    const float* s = scales.data_ptr<float>();
    const int32_t* sum = sums.data_ptr<int32_t>();
    const float* b = bias.numel() > 0 ? bias.data_ptr<float>() : nullptr;
    // y[lo + i] = dequantized acc[i]
    auto dequantize = [&](const int32_t* acc, int64_t lo, int64_t hi) {
      for (int64_t n = lo; n < hi; ++n) {
        y[n] = static_cast<float>(acc[n - lo] - zero * sum[n]) * (scale * s[n]);
      }
    };
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      int32_t acc[kRows];
      for (int64_t g = begin; g < end; ++g) {
        group_dot(weights + g * k_size * kRows, xq.data(), k_size, acc);
        dequantize(acc, g * kRows, (g + 1) * kRows);
      }
      finish(b, y, begin * kRows, end * kRows, epilogue);
    });
    const int64_t done = groups * kRows;
    int32_t acc[kRows];
    for (int64_t r = 0; r < tail.size(0); ++r) {
      acc[r] = row_dot(tail.data_ptr<int8_t>() + r * k_size, xq.data(), k_size);
    }
    dequantize(acc, done, n_size);
    finish(b, y, done, n_size, epilogue);
  }
};

// A projection's tensors, checked once per call: blocks (N/8, K/S, 8, S) and tail
// (N % 8, K) of the weight type; for int8 also scales (N,) float32 and sums (N,) int32
// (each row's sum of its int8 weights); bias (N,) of the activation type, or empty (none).
// Returns N.
template <class P>
int64_t check(const at::Tensor* w, int64_t k) {
  const at::Tensor &blocks = w[0], &tail = w[1];
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == kRows && blocks.size(3) == P::kSlice &&
                  blocks.size(1) * P::kSlice == k && blocks.is_contiguous() &&
                  blocks.scalar_type() == P::kWeight,
              "row_decode: a projection's blocks must be (N/8, K/S, 8, S) with K = ", k);
  TORCH_CHECK(tail.dim() == 2 && tail.size(0) < kRows && tail.size(1) == k &&
                  tail.is_contiguous() && tail.scalar_type() == P::kWeight,
              "row_decode: a projection's tail must be (N % 8, K)");
  const int64_t n = blocks.size(0) * kRows + tail.size(0);
  for (int i = 2; i < P::kTensors; ++i) {
    const bool absent_bias = i == P::kTensors - 1 && w[i].numel() == 0;
    TORCH_CHECK(absent_bias || (w[i].dim() == 1 && w[i].size(0) == n && w[i].is_contiguous()),
                "row_decode: a projection's vectors must be (N,)");
  }
  if constexpr (P::kTensors == 5) {
    TORCH_CHECK(w[2].scalar_type() == at::kFloat && w[3].scalar_type() == at::kInt,
                "row_decode: int8 scales float32, sums int32");
  }
  const at::Tensor& bias = w[P::kTensors - 1];
  TORCH_CHECK(bias.numel() == 0 || bias.scalar_type() == c10::CppTypeToScalarType<typename P::Act>::value,
              "row_decode: a bias must have the activations' dtype");
  return n;
}

// out = layer_norm(x) over C elements in the activation type, statistics in float32.
template <class Act>
void layer_norm(const Act* x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                int64_t c, Act* out) {
  TORCH_CHECK(weight.numel() == c && bias.numel() == c && weight.is_contiguous() &&
                  bias.is_contiguous() &&
                  weight.scalar_type() == c10::CppTypeToScalarType<Act>::value &&
                  bias.scalar_type() == weight.scalar_type(),
              "row_decode: layer norm weight and bias must be (C,) in the activations' dtype");
  const Act* w = weight.data_ptr<Act>();
  const Act* b = bias.data_ptr<Act>();
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
    out[i] = Act(v * static_cast<float>(w[i]) + static_cast<float>(b[i]));
  }
}

// Attention of one query over positions 0..pos of one slot. qkv (3C,) float32: q, k, v;
// k and v are written into the cache at pos first. keys, values: the slot's (H, T, D).
void attend(const float* qkv, float* keys, float* values, int64_t heads, int64_t t,
            int64_t d, int64_t pos, float scale, float* out) {
  const int64_t c = heads * d, head_stride = t * d, length = pos + 1;
  for (int64_t h = 0; h < heads; ++h) {
    std::copy_n(qkv + c + h * d, d, keys + h * head_stride + pos * d);
    std::copy_n(qkv + 2 * c + h * d, d, values + h * head_stride + pos * d);
  }
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(length);
    for (int64_t h = begin; h < end; ++h) {
      const float* q = qkv + h * d;
      const float* k = keys + h * head_stride;
      const float* v = values + h * head_stride;
      float top = -INFINITY;
      for (int64_t l = 0; l < length; ++l) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < d; i += 16) {
          acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), _mm512_loadu_ps(k + l * d + i), acc);
        }
        scores[l] = _mm512_reduce_add_ps(acc) * scale;
        top = std::max(top, scores[l]);
      }
      float total = 0.0f;
      for (int64_t l = 0; l < length; ++l) {
        scores[l] = std::exp(scores[l] - top);
        total += scores[l];
      }
      for (int64_t i = 0; i < d; i += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t l = 0; l < length; ++l) {
          acc = _mm512_fmadd_ps(_mm512_set1_ps(scores[l]), _mm512_loadu_ps(v + l * d + i), acc);
        }
        _mm512_storeu_ps(out + h * d + i, _mm512_div_ps(acc, _mm512_set1_ps(total)));
      }
    }
  });
}

// One transformer block for one sequence. x: residual stream (C,) in the activation type,
// updated in place. kv: this layer's cache (2, S, H, T, D) float32; the sequence's key and
// value are written at [:, slot, :, pos] and it attends to positions 0..pos of its slot.
// w: ln_1 weight, bias; qkv; attn_out; ln_2 weight, bias; fc; mlp_out (each projection
// P::kTensors tensors). eps: ln_1's and ln_2's (GPT-2 configures one for both).
template <class P>
void block(at::Tensor x, at::TensorList w, at::Tensor kv, int64_t slot, int64_t pos,
           double scale, double eps) {
  using Act = typename P::Act;
  constexpr int kP = P::kTensors;
  TORCH_CHECK(w.size() == 4 + 4 * kP, "row_decode: block takes ", 4 + 4 * kP, " tensors");
  const int64_t c = x.size(0);
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() &&
                  x.scalar_type() == c10::CppTypeToScalarType<Act>::value,
              "row_decode: x must be (C,) in the activations' dtype");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous() &&
                  kv.scalar_type() == at::kFloat && kv.size(2) * kv.size(4) == c,
              "row_decode: kv must be (2, S, H, T, D) float32 with H * D = C");
  const int64_t slots = kv.size(1), heads = kv.size(2), t = kv.size(3), d = kv.size(4);
  TORCH_CHECK(slot >= 0 && slot < slots && pos >= 0 && pos < t,
              "row_decode: slot ", slot, " or position ", pos, " out of range");
  TORCH_CHECK(d % 16 == 0, "row_decode: the head size must be a multiple of 16");
  const at::Tensor* qkv_w = &w[2];
  const at::Tensor* out_w = &w[2 + kP];
  const at::Tensor* fc_w = &w[4 + 2 * kP];
  const at::Tensor* mlp_w = &w[4 + 3 * kP];
  TORCH_CHECK(check<P>(qkv_w, c) == 3 * c && check<P>(out_w, c) == c,
              "row_decode: attention projections must be (3C, C) and (C, C)");
  const int64_t hidden = check<P>(fc_w, c);
  TORCH_CHECK(check<P>(mlp_w, hidden) == c, "row_decode: the MLP must map C -> hidden -> C");

  Act* xs = x.data_ptr<Act>();
  std::vector<Act> act(std::max(c, hidden));
  std::vector<float> y(std::max(3 * c, hidden));
  std::vector<float> attended(c);

  // q, k, v = split(ln_1(x) W_qkv + b); attention over the slot's cache.
  layer_norm(xs, w[0], w[1], eps, c, act.data());
  P::gemv(qkv_w, act.data(), y.data(), Epilogue::kNone);
  float* cache = kv.data_ptr<float>();
  const int64_t slot_stride = heads * t * d;
  attend(y.data(), cache + slot * slot_stride, cache + (slots + slot) * slot_stride, heads, t, d,
         pos, static_cast<float>(scale), attended.data());

  // x = x + attended W_o + b
  for (int64_t i = 0; i < c; ++i) act[i] = P::store(attended[i]);
  P::gemv(out_w, act.data(), y.data(), Epilogue::kNone);
  for (int64_t i = 0; i < c; ++i) xs[i] = P::store(static_cast<float>(xs[i]) + y[i]);

  // x = x + gelu(ln_2(x) W_fc + b) W_out + b
  layer_norm(xs, w[2 + 2 * kP], w[3 + 2 * kP], eps, c, act.data());
  P::gemv(fc_w, act.data(), y.data(), Epilogue::kGelu);
  for (int64_t i = 0; i < hidden; ++i) act[i] = P::store(y[i]);
  P::gemv(mlp_w, act.data(), y.data(), Epilogue::kNone);
  for (int64_t i = 0; i < c; ++i) xs[i] = P::store(static_cast<float>(xs[i]) + y[i]);
}

// Next-token logits (V,) float32 = ln_f(x) W_head^T. w: the head's projection tensors
// (no bias).
template <class P>
at::Tensor head(at::Tensor x, at::Tensor ln_weight, at::Tensor ln_bias, double eps,
                at::TensorList w) {
  using Act = typename P::Act;
  TORCH_CHECK(w.size() == P::kTensors, "row_decode: head takes ", P::kTensors, " tensors");
  const int64_t c = x.size(0);
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous() &&
                  x.scalar_type() == c10::CppTypeToScalarType<Act>::value,
              "row_decode: x must be (C,) in the activations' dtype");
  const int64_t n = check<P>(w.data(), c);
  std::vector<Act> normed(c);
  layer_norm(x.data_ptr<Act>(), ln_weight, ln_bias, eps, c, normed.data());
  at::Tensor logits = at::empty({n}, x.options().dtype(at::kFloat));
  P::gemv(w.data(), normed.data(), logits.data_ptr<float>(), Epilogue::kNone);
  return logits;
}

}  // namespace

#define TEXTGEN_ROW_OPS(kind)                                                               \
  m.def("block_" kind                                                                       \
        "(Tensor(a!) x, Tensor[] w, Tensor(b!) kv, int slot, int pos, float scale, "        \
        "float eps) -> ()");                                                                \
  m.def("head_" kind "(Tensor x, Tensor ln_weight, Tensor ln_bias, float eps, Tensor[] w) " \
        "-> Tensor")

TORCH_LIBRARY(textgen_row, m) {
  TEXTGEN_ROW_OPS("bf16");
  TEXTGEN_ROW_OPS("int8");
}

TORCH_LIBRARY_IMPL(textgen_row, CPU, m) {
  m.impl("block_bf16", &block<Bf16>);
  m.impl("head_bf16", &head<Bf16>);
  m.impl("block_int8", &block<Int8>);
  m.impl("head_int8", &head<Int8>);
}
