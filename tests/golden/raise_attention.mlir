func @forward(%q: tensor<1x2x4x8xf32>, %k: tensor<1x1x4x8xf32>, %v: tensor<1x1x4x8xf32>, %mask: tensor<1x1x4x4xf32>) {
  %attention_default = tx.attention(%q, %k, %v, %mask) {scale = 0.35355339059327373, is_causal = false} : (tensor<1x2x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x4xf32>) -> tensor<1x2x4x8xf32>
  return %attention_default
}
