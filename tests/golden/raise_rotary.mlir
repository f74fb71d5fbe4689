func @forward(%q: tensor<1x2x4x8xf32>, %k: tensor<1x1x4x8xf32>, %cos: tensor<1x1x4x8xf32>, %sin: tensor<1x1x4x8xf32>) {
  %rotary_default = tx.rotary(%q, %cos, %sin) : (tensor<1x2x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x8xf32>) -> tensor<1x2x4x8xf32>
  %rotary_default_1 = tx.rotary(%k, %cos, %sin) : (tensor<1x1x4x8xf32>, tensor<1x1x4x8xf32>, tensor<1x1x4x8xf32>) -> tensor<1x1x4x8xf32>
  return %rotary_default, %rotary_default_1
}
