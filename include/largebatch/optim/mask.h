#pragma once
// Per-tensor predicates deciding which tensors get weight decay and which get the layer-wise trust
// ratio. Masks are plain data (an ndim threshold and name patterns), so they print, parse and survive
// a checkpoint; no callables.
#include <cstdint>
#include <string>
#include <vector>

namespace largebatch {
namespace optim {

struct ParamMask {
  // Tensors with ndim <= exclude_max_ndim are excluded; -1 excludes none by dimension.
  int64_t exclude_max_ndim = 1;
  // ECMAScript regular expressions searched in the parameter's name; a match excludes the tensor.
  std::vector<std::string> exclude_names;

  static ParamMask all() { return ParamMask{-1, {}}; }             // every tensor
  static ParamMask exclude_1d() { return ParamMask{1, {}}; }       // the default: biases, norms out
  static ParamMask none() { return ParamMask{INT64_MAX, {}}; }     // no tensor

  // True where the mask applies to (includes) a tensor with this name and dimensionality.
  bool applies(const std::string& name, int64_t ndim) const;

  // Text form, e.g. "ndim<=1", "all", "none", "ndim<=1;name~bias;name~bn".
  std::string to_string() const;
  // Inverse of to_string; throws std::invalid_argument naming `what` and the bad text.
  static ParamMask parse(const std::string& text, const std::string& what = "mask");

  bool operator==(const ParamMask& other) const {
    return exclude_max_ndim == other.exclude_max_ndim && exclude_names == other.exclude_names;
  }
  bool operator!=(const ParamMask& other) const { return !(*this == other); }
};

}  // namespace optim
}  // namespace largebatch
