func @forward(%x: tensor<2x4xf32>) {
  %inp_weight = param "inp.weight" : tensor<4x4xf32>
  %inp_bias = param "inp.bias" : tensor<4xf32>
  %blocks_0_fc_weight = param "blocks.0.fc.weight" : tensor<4x4xf32>
  %blocks_0_fc_bias = param "blocks.0.fc.bias" : tensor<4xf32>
  %blocks_2_fc_weight = param "blocks.2.fc.weight" : tensor<4x4xf32>
  %blocks_2_fc_bias = param "blocks.2.fc.bias" : tensor<4xf32>
  %blocks_4_fc_weight = param "blocks.4.fc.weight" : tensor<4x4xf32>
  %blocks_4_fc_bias = param "blocks.4.fc.bias" : tensor<4xf32>
  %out_weight = param "out.weight" : tensor<4x4xf32>
  %out_bias = param "out.bias" : tensor<4xf32>
  %linear = aten.linear(%x, %inp_weight, %inp_bias) : (tensor<2x4xf32>, tensor<4x4xf32>, tensor<4xf32>) -> tensor<2x4xf32>
  %linear_1 = aten.linear(%linear, %blocks_0_fc_weight, %blocks_0_fc_bias) : (tensor<2x4xf32>, tensor<4x4xf32>, tensor<4xf32>) -> tensor<2x4xf32>
  %relu = aten.relu(%linear_1) : (tensor<2x4xf32>) -> tensor<2x4xf32>
  %add = aten.add.Tensor(%linear, %relu) : (tensor<2x4xf32>, tensor<2x4xf32>) -> tensor<2x4xf32>
  %linear_3 = aten.linear(%add, %blocks_2_fc_weight, %blocks_2_fc_bias) : (tensor<2x4xf32>, tensor<4x4xf32>, tensor<4xf32>) -> tensor<2x4xf32>
  %relu_2 = aten.relu(%linear_3) : (tensor<2x4xf32>) -> tensor<2x4xf32>
  %add_2 = aten.add.Tensor(%add, %relu_2) : (tensor<2x4xf32>, tensor<2x4xf32>) -> tensor<2x4xf32>
  %linear_5 = aten.linear(%add_2, %blocks_4_fc_weight, %blocks_4_fc_bias) : (tensor<2x4xf32>, tensor<4x4xf32>, tensor<4xf32>) -> tensor<2x4xf32>
  %relu_4 = aten.relu(%linear_5) : (tensor<2x4xf32>) -> tensor<2x4xf32>
  %add_4 = aten.add.Tensor(%add_2, %relu_4) : (tensor<2x4xf32>, tensor<2x4xf32>) -> tensor<2x4xf32>
  %linear_6 = aten.linear(%add_4, %out_weight, %out_bias) : (tensor<2x4xf32>, tensor<4x4xf32>, tensor<4xf32>) -> tensor<2x4xf32>
  return %linear_6
}
