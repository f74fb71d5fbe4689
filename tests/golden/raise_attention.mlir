func @forward(%q: tensor<1x2x4x8xf32>, %k: tensor<1x1x4x8xf32>, %v: tensor<1x1x4x8xf32>, %mask: tensor<1x1x4x4xf32>) {
  %attention_default = tx.attention(%q, %k, %v, %mask) {scale = 0.35355339059327373, is_causal = false} : (tensor<1x2x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x4xf32>) -> tensor<1x2x4x8xf32>
  %eq_scalar = aten.eq.Scalar(%mask) {other = -inf} : (tensor<1x1x4x4xf32>) -> tensor<1x1x4x4xi1>
  %all_dim = aten.all.dim(%eq_scalar) {dim = -1, keepdim = true} : (tensor<1x1x4x4xi1>) -> tensor<1x1x4x1xi1>
  %where_scalar_self = aten.where.ScalarSelf(%all_dim, %attention_default) {self = nan} : (tensor<1x1x4x1xi1>, tensor<1x2x4x8xf32>) -> tensor<1x2x4x8xf32>
  return %where_scalar_self
}
