func @forward(%x: tensor<1x2x4xf32>) {
  %gate_weight = param "gate.weight" : tensor<8x4xf32>
  %up_weight = param "up.weight" : tensor<8x4xf32>
  %down_weight = param "down.weight" : tensor<4x8xf32>
  %linear = aten.linear(%x, %gate_weight) : (tensor<1x2x4xf32>, tensor<8x4xf32>) -> tensor<1x2x8xf32>
  %linear_1 = aten.linear(%x, %up_weight) : (tensor<1x2x4xf32>, tensor<8x4xf32>) -> tensor<1x2x8xf32>
  %gated_act_default = tx.gated_act(%linear, %linear_1) {act = "silu"} : (tensor<1x2x8xf32>, tensor<1x2x8xf32>) -> tensor<1x2x8xf32>
  %gated_act_default_1 = tx.gated_act(%linear, %linear_1) {act = "gelu"} : (tensor<1x2x8xf32>, tensor<1x2x8xf32>) -> tensor<1x2x8xf32>
  %add_1 = aten.add.Tensor(%gated_act_default, %gated_act_default_1) : (tensor<1x2x8xf32>, tensor<1x2x8xf32>) -> tensor<1x2x8xf32>
  %linear_3 = aten.linear(%add_1, %down_weight) : (tensor<1x2x8xf32>, tensor<4x8xf32>) -> tensor<1x2x4xf32>
  return %linear_3
}
