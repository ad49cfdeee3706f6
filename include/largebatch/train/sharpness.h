#pragma once
// Sharpness: the top eigenvalue of the training loss's Hessian, by power iteration on Hessian-vector
// products (double backward). The paper argues about sharp minimisers; this measures them.
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace largebatch {
namespace train {

struct SharpnessOptions {
  int64_t max_iterations = 20;
  double relative_tolerance = 1e-3;  // stop when the estimate changes by less than this fraction
  uint64_t seed = 0;                 // of the starting vector
};

struct SharpnessEstimate {
  double eigenvalue = 0;    // the eigenvalue of largest magnitude (the top one when the loss is locally convex)
  int64_t iterations = 0;
  bool converged = false;
};

// loss() builds the scalar loss from params (with its graph); it is called once: the gradient is built
// with create_graph and every iteration differentiates g . v again. params must require gradients; their
// .grad fields are left untouched.
SharpnessEstimate top_hessian_eigenvalue(const std::function<torch::Tensor()>& loss,
                                         const std::vector<torch::Tensor>& params,
                                         const SharpnessOptions& options = {});

}  // namespace train
}  // namespace largebatch
