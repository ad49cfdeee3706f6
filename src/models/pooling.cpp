// 2-D max pooling for CPU training (include/largebatch/models/pooling.h says what and why).
#include "largebatch/models/pooling.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <limits>

namespace largebatch {
namespace models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct PlaneShape {
  int64_t height, width, out_height, out_width;
};

int64_t pooled_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

// Planes per parallel chunk: about 32 K input elements each, so a chunk is worth a thread.
int64_t plane_grain(const PlaneShape& s) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, s.height * s.width)); }

// One output, as ATen computes it: the running maximum starts at -inf on the window's first tap inside the map,
// and takes each tap (row by row, left to right) that is greater or NaN.
template <typename T>
void pool_one(const T* in, const PlaneShape& s, const MaxPool2dGeometry& g, int64_t ih_begin, int64_t ih_end,
              int64_t ow, T* maximum, int32_t* position) {
  const int64_t iw0 = ow * g.stride_w - g.padding_w;
  const int64_t iw_begin = std::max<int64_t>(iw0, 0), iw_end = std::min(iw0 + g.kernel_w, s.width);
  T m = -std::numeric_limits<T>::infinity();
  int64_t k = ih_begin * s.width + iw_begin;
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    for (int64_t iw = iw_begin; iw < iw_end; ++iw) {
      const T v = in[ih * s.width + iw];
      if (v > m || v != v) {
        m = v;
        k = ih * s.width + iw;
      }
    }
  }
  *maximum = m;
  *position = static_cast<int32_t>(k);
}

#if defined(__SSE2__)
// Keeps, lane by lane, the candidate (value v at position `at`) where it is greater than the maximum or NaN.
inline void take_four(__m128 v, __m128i at, __m128& maximum, __m128i& position) {
  const __m128 mask = _mm_or_ps(_mm_cmpgt_ps(v, maximum), _mm_cmpunord_ps(v, v));
  maximum = _mm_or_ps(_mm_and_ps(mask, v), _mm_andnot_ps(mask, maximum));
  const __m128i imask = _mm_castps_si128(mask);
  position = _mm_or_si128(_mm_and_si128(imask, at), _mm_andnot_si128(imask, position));
}

// p[0], p[stride], p[2 stride], p[3 stride], reading nothing past p[3 stride].
inline __m128 load_four(const float* p, int64_t stride) {
  if (stride == 1) return _mm_loadu_ps(p);
  if (stride == 2) return _mm_shuffle_ps(_mm_loadu_ps(p), _mm_loadu_ps(p + 3), _MM_SHUFFLE(3, 1, 2, 0));
  return _mm_setr_ps(p[0], p[stride], p[2 * stride], p[3 * stride]);
}

// Outputs ow..ow+3 of a row whose windows lie inside the map: pool_one's comparisons, four outputs at a time.
inline void pool_four(const float* in, const PlaneShape& s, const MaxPool2dGeometry& g, int64_t ih_begin,
                      int64_t ih_end, int64_t ow, float* maximum, int32_t* position) {
  const int64_t iw0 = ow * g.stride_w - g.padding_w;
  const int32_t step = static_cast<int32_t>(g.stride_w);
  const __m128i lanes = _mm_setr_epi32(0, step, 2 * step, 3 * step);
  __m128 m = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  __m128i k = _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(ih_begin * s.width + iw0)), lanes);
  for (int64_t ih = ih_begin; ih < ih_end; ++ih) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t at = ih * s.width + iw0 + kw;
      take_four(load_four(in + at, g.stride_w), _mm_add_epi32(_mm_set1_epi32(static_cast<int32_t>(at)), lanes), m, k);
    }
  }
  _mm_storeu_ps(maximum, m);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(position), k);
}
#endif

// Any geometry: outputs whose windows reach into the padding one at a time, the others four at a time.
template <typename T>
void pool_planes(const T* input, T* output, int32_t* positions, int64_t begin, int64_t end, const PlaneShape& s,
                 const MaxPool2dGeometry& g) {
  const int64_t in_plane = s.height * s.width, out_plane = s.out_height * s.out_width;
  // Outputs [inside_begin, inside_end) of a row have every tap inside the row.
  const int64_t inside_begin = std::min(s.out_width, (g.padding_w + g.stride_w - 1) / g.stride_w);
  const int64_t right = s.width - g.kernel_w + g.padding_w;
  const int64_t inside_end = std::max(inside_begin, right < 0 ? 0 : std::min(s.out_width, right / g.stride_w + 1));
  for (int64_t p = begin; p < end; ++p) {
    const T* in = input + p * in_plane;
    for (int64_t oh = 0; oh < s.out_height; ++oh) {
      T* maximum = output + p * out_plane + oh * s.out_width;
      int32_t* position = positions + p * out_plane + oh * s.out_width;
      const int64_t ih0 = oh * g.stride_h - g.padding_h;
      const int64_t ih_begin = std::max<int64_t>(ih0, 0), ih_end = std::min(ih0 + g.kernel_h, s.height);
      int64_t ow = 0;
      for (; ow < inside_begin; ++ow) pool_one(in, s, g, ih_begin, ih_end, ow, maximum + ow, position + ow);
#if defined(__SSE2__)
      if constexpr (std::is_same_v<T, float>) {
        // A stretch whose length is not a multiple of 4 ends with four outputs that overlap the previous ones
        // (each output is a function of the input alone, so computing it twice is harmless).
        if (inside_end - inside_begin >= 4) {
          for (; ow < inside_end; ow += 4) {
            ow = std::min(ow, inside_end - 4);
            pool_four(in, s, g, ih_begin, ih_end, ow, maximum + ow, position + ow);
          }
          ow = inside_end;
        }
      }
#endif
      for (; ow < s.out_width; ++ow) pool_one(in, s, g, ih_begin, ih_end, ow, maximum + ow, position + ow);
    }
  }
}

#if defined(__SSE2__)
// Eight consecutive elements as floats, and four floats stored back. A bfloat16 is the high half of the float
// of the same value, so widening is exact, and a maximum (always one of the inputs) narrows back to its own bits.
inline void load_eight(const float* p, __m128& lo, __m128& hi) {
  lo = _mm_loadu_ps(p);
  hi = _mm_loadu_ps(p + 4);
}
inline void load_eight(const c10::BFloat16* p, __m128& lo, __m128& hi) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  lo = _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v));
  hi = _mm_castsi128_ps(_mm_unpackhi_epi16(_mm_setzero_si128(), v));
}
inline void store_four(float* p, __m128 v) { _mm_storeu_ps(p, v); }
inline void store_four(c10::BFloat16* p, __m128 v) {
  // Arithmetic shift: the signed 16-bit results pack without saturation and keep their bits.
  const __m128i high = _mm_srai_epi32(_mm_castps_si128(v), 16);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(high, high));
}

// The common case (2x2 windows, stride 2, no padding, rows of at least 4 outputs), one pair of input rows at a
// time: each row's 8 elements are loaded once and split into left and right taps; the same comparisons as pool_one.
template <typename T>
void pool_planes_2x2(const T* input, T* output, int32_t* positions, int64_t begin, int64_t end,
                     const PlaneShape& s) {
  const int64_t w = s.width, in_plane = s.height * s.width, out_plane = s.out_height * s.out_width;
  for (int64_t p = begin; p < end; ++p) {
    for (int64_t oh = 0; oh < s.out_height; ++oh) {
      const int32_t start = static_cast<int32_t>(2 * oh * w);
      const T* top = input + p * in_plane + start;
      const T* bottom = top + w;
      T* maximum = output + p * out_plane + oh * s.out_width;
      int32_t* position = positions + p * out_plane + oh * s.out_width;
      for (int64_t ow = 0; ow < s.out_width; ow += 4) {
        ow = std::min(ow, s.out_width - 4);  // the last four may overlap the previous ones (see pool_planes)
        __m128 top_lo, top_hi, bottom_lo, bottom_hi;
        load_eight(top + 2 * ow, top_lo, top_hi);
        load_eight(bottom + 2 * ow, bottom_lo, bottom_hi);
        const __m128i column = _mm_add_epi32(_mm_set1_epi32(start + 2 * static_cast<int32_t>(ow)), _mm_setr_epi32(0, 2, 4, 6));
        // The first tap always replaces the initial -inf (it is greater, NaN or -inf itself).
        __m128 m = _mm_shuffle_ps(top_lo, top_hi, _MM_SHUFFLE(2, 0, 2, 0));
        __m128i k = column;
        take_four(_mm_shuffle_ps(top_lo, top_hi, _MM_SHUFFLE(3, 1, 3, 1)), _mm_add_epi32(column, _mm_set1_epi32(1)), m, k);
        take_four(_mm_shuffle_ps(bottom_lo, bottom_hi, _MM_SHUFFLE(2, 0, 2, 0)),
                  _mm_add_epi32(column, _mm_set1_epi32(static_cast<int32_t>(w))), m, k);
        take_four(_mm_shuffle_ps(bottom_lo, bottom_hi, _MM_SHUFFLE(3, 1, 3, 1)),
                  _mm_add_epi32(column, _mm_set1_epi32(static_cast<int32_t>(w + 1))), m, k);
        store_four(maximum + ow, m);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(position + ow), k);
      }
    }
  }
}
#endif

#if defined(__SSE2__)
// Where the 2x2 paths apply: 2x2 windows of stride 2 without padding, rows of at least 4 outputs.
bool takes_2x2_path(const MaxPool2dGeometry& g, const PlaneShape& s) {
  return g.kernel_h == 2 && g.kernel_w == 2 && g.stride_h == 2 && g.stride_w == 2 && g.padding_h == 0 &&
         g.padding_w == 0 && s.out_width >= 4;
}
#endif

template <typename T>
void pool_forward(const torch::Tensor& input, torch::Tensor& output, torch::Tensor& positions, const PlaneShape& s,
                  const MaxPool2dGeometry& g) {
  const T* in = input.data_ptr<T>();
  T* out = output.data_ptr<T>();
  int32_t* pos = positions.data_ptr<int32_t>();
  const int64_t planes = input.size(0) * input.size(1);
  at::parallel_for(0, planes, plane_grain(s), [&](int64_t begin, int64_t end) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      if (takes_2x2_path(g, s))
        return pool_planes_2x2(in, out, pos, begin, end, s);
    }
#endif
    pool_planes(in, out, pos, begin, end, s, g);
  });
}

#if defined(__SSE2__)
// Four output gradients as floats (exact for bfloat16), and eight input gradients stored back.
inline __m128 load_grads(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load_grads(const c10::BFloat16* p) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), v));
}
inline void store_eight(float* p, __m128 lo, __m128 hi) {
  _mm_storeu_ps(p, lo);
  _mm_storeu_ps(p + 4, hi);
}
// Values that are bfloat16 exactly, or NaN, which becomes 0x7FC0 as c10's float-to-bfloat16 conversion makes it
// (what ATen's bfloat16 sums store).
inline __m128i narrow_bf16(__m128 v) {
  const __m128i nan = _mm_castps_si128(_mm_cmpunord_ps(v, v));
  const __m128i bits = _mm_or_si128(_mm_andnot_si128(nan, _mm_castps_si128(v)), _mm_and_si128(nan, _mm_set1_epi32(0x7FC00000)));
  return _mm_srai_epi32(bits, 16);
}
inline void store_eight(c10::BFloat16* p, __m128 lo, __m128 hi) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(narrow_bf16(lo), narrow_bf16(hi)));
}

// The backward pass of 2x2 windows of stride 2 without padding (rows of at least 4 outputs): no two windows share
// an input, so each input's gradient is 0 + the gradient of the output it won, or +0; written directly, four
// outputs (two rows of eight inputs) at a time, instead of zeroing the map and adding.
template <typename T>
void unpool_planes_2x2(const T* grad_output, const int32_t* positions, T* grad_input, int64_t begin, int64_t end,
                       const PlaneShape& s) {
  const int64_t w = s.width, in_plane = s.height * s.width, out_plane = s.out_height * s.out_width;
  const __m128 zero = _mm_setzero_ps();
  for (int64_t p = begin; p < end; ++p) {
    T* plane = grad_input + p * in_plane;
    for (int64_t oh = 0; oh < s.out_height; ++oh) {
      const T* g = grad_output + p * out_plane + oh * s.out_width;
      const int32_t* won = positions + p * out_plane + oh * s.out_width;
      const int32_t start = static_cast<int32_t>(2 * oh * w);
      T* top = plane + start;
      T* bottom = top + w;
      for (int64_t ow = 0; ow < s.out_width; ow += 4) {
        ow = std::min(ow, s.out_width - 4);  // the last four may overlap the previous ones: the same values again
        const __m128 v = _mm_add_ps(load_grads(g + ow), zero);  // -0 becomes +0, as 0 + g does
        const __m128i k = _mm_loadu_si128(reinterpret_cast<const __m128i*>(won + ow));
        const __m128i tap = _mm_add_epi32(_mm_set1_epi32(start + 2 * static_cast<int32_t>(ow)), _mm_setr_epi32(0, 2, 4, 6));
        auto at = [&](int32_t offset) {
          return _mm_and_ps(_mm_castsi128_ps(_mm_cmpeq_epi32(k, _mm_add_epi32(tap, _mm_set1_epi32(offset)))), v);
        };
        const __m128 top_left = at(0), top_right = at(1);
        const __m128 bottom_left = at(static_cast<int32_t>(w)), bottom_right = at(static_cast<int32_t>(w + 1));
        store_eight(top + 2 * ow, _mm_unpacklo_ps(top_left, top_right), _mm_unpackhi_ps(top_left, top_right));
        store_eight(bottom + 2 * ow, _mm_unpacklo_ps(bottom_left, bottom_right), _mm_unpackhi_ps(bottom_left, bottom_right));
      }
      // An odd width leaves a last column no window covers.
      if (w > 2 * s.out_width) top[2 * s.out_width] = bottom[2 * s.out_width] = T(0);
    }
    // And an odd height a last row (or more, for maps the windows do not fill).
    const int64_t covered = 2 * s.out_height * w;
    std::fill(plane + covered, plane + in_plane, T(0));
  }
}
#endif

// Per input map: zero it (in cache) and add each output's gradient at its maximum, in output order.
template <typename T>
void pool_backward(const torch::Tensor& grad_output, const torch::Tensor& positions, torch::Tensor& grad_input,
                   const PlaneShape& s, const MaxPool2dGeometry& g) {
  const T* gy = grad_output.data_ptr<T>();
  const int32_t* pos = positions.data_ptr<int32_t>();
  T* gx = grad_input.data_ptr<T>();
  const int64_t in_plane = s.height * s.width, out_plane = s.out_height * s.out_width;
  const int64_t planes = grad_input.size(0) * grad_input.size(1);
  at::parallel_for(0, planes, plane_grain(s), [&](int64_t begin, int64_t end) {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      if (takes_2x2_path(g, s))
        return unpool_planes_2x2(gy, pos, gx, begin, end, s);
    }
#endif
    for (int64_t p = begin; p < end; ++p) {
      T* x = gx + p * in_plane;
      std::memset(x, 0, sizeof(T) * in_plane);
      const T* y = gy + p * out_plane;
      const int32_t* a = pos + p * out_plane;
      for (int64_t o = 0; o < out_plane; ++o) x[a[o]] += y[o];
    }
  });
}

PlaneShape plane_shape(const torch::Tensor& input, const MaxPool2dGeometry& g) {
  const int64_t h = input.size(2), w = input.size(3);
  return {h, w, pooled_size(h, g.kernel_h, g.stride_h, g.padding_h), pooled_size(w, g.kernel_w, g.stride_w, g.padding_w)};
}

class MaxPool2dFunction : public torch::autograd::Function<MaxPool2dFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, int64_t kernel_h, int64_t kernel_w,
                               int64_t stride_h, int64_t stride_w, int64_t padding_h, int64_t padding_w) {
    const MaxPool2dGeometry g{kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w};
    const PlaneShape s = plane_shape(input, g);
    auto output = torch::empty({input.size(0), input.size(1), s.out_height, s.out_width}, input.options());
    auto positions = torch::empty(output.sizes(), input.options().dtype(torch::kInt32));
    if (input.scalar_type() == torch::kDouble)
      pool_forward<double>(input, output, positions, s, g);
    else if (input.scalar_type() == torch::kBFloat16)
      pool_forward<c10::BFloat16>(input, output, positions, s, g);
    else
      pool_forward<float>(input, output, positions, s, g);
    ctx->save_for_backward({positions});
    ctx->saved_data["input_sizes"] = input.sizes().vec();
    ctx->saved_data["geometry"] = std::vector<int64_t>{kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w};
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto positions = ctx->get_saved_variables()[0];
    const auto sizes = ctx->saved_data["input_sizes"].toIntVector();
    const auto grad = grad_outputs[0].contiguous();
    const int64_t planes = sizes[0] * sizes[1];
    torch::Tensor grad_input;
    if (torch::GradMode::is_enabled()) {
      // create_graph: the same sums through a differentiable operation, for a second derivative.
      grad_input = torch::zeros({planes, sizes[2] * sizes[3]}, grad.options())
                       .scatter_add(1, positions.reshape({planes, -1}).to(torch::kLong), grad.reshape({planes, -1}))
                       .view(sizes);
    } else {
      grad_input = torch::empty(sizes, grad.options());
      const PlaneShape s{sizes[2], sizes[3], positions.size(2), positions.size(3)};
      const auto k = ctx->saved_data["geometry"].toIntVector();
      const MaxPool2dGeometry g{k[0], k[1], k[2], k[3], k[4], k[5]};
      if (grad.scalar_type() == torch::kDouble)
        pool_backward<double>(grad, positions, grad_input, s, g);
      else if (grad.scalar_type() == torch::kBFloat16)
        pool_backward<c10::BFloat16>(grad, positions, grad_input, s, g);
      else
        pool_backward<float>(grad, positions, grad_input, s, g);
    }
    return {grad_input, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool max_pool2d_takes_own_kernel(const torch::Tensor& input, const MaxPool2dGeometry& g) {
  if (!input.defined() || input.dim() != 4 || !input.device().is_cpu() || !input.is_contiguous() ||
      (input.scalar_type() != torch::kFloat && input.scalar_type() != torch::kDouble &&
       input.scalar_type() != torch::kBFloat16) ||
      !torch::GradMode::is_enabled() || !input.requires_grad() || input._fw_grad(/*level=*/0).defined())
    return false;
  if (g.kernel_h < 1 || g.kernel_w < 1 || g.stride_h < 1 || g.stride_w < 1 || g.padding_h < 0 || g.padding_w < 0 ||
      g.padding_h > g.kernel_h / 2 || g.padding_w > g.kernel_w / 2)
    return false;
  const int64_t h = input.size(2), w = input.size(3);
  if (h < 1 || w < 1 || h + 2 * g.padding_h < g.kernel_h || w + 2 * g.padding_w < g.kernel_w) return false;
  return input.size(0) > 0 && input.size(1) > 0 && h * w < (int64_t{1} << 31);
}

torch::Tensor max_pool2d(const torch::Tensor& input, const MaxPool2dGeometry& g, bool own_kernel) {
  if (own_kernel && max_pool2d_takes_own_kernel(input, g)) {
    RECORD_FUNCTION("largebatch::max_pool2d", std::vector<c10::IValue>{});  // named in profiles (bench profile)
    return MaxPool2dFunction::apply(input, g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.padding_h, g.padding_w);
  }
  return torch::max_pool2d(input, {g.kernel_h, g.kernel_w}, {g.stride_h, g.stride_w}, {g.padding_h, g.padding_w});
}

}  // namespace models
}  // namespace largebatch
