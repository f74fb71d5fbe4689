func @forward(%x: tensor<2x3x8xf32>, %mask: tensor<2x3x4xi1>) {
  %lin_weight = param "lin.weight" : tensor<4x8xf32>
  %lin_bias = param "lin.bias" : tensor<4xf32>
  %_folded_add = param "_folded_add" : tensor<4xf32>
  %linear = aten.linear(%x, %lin_weight, %lin_bias) : (tensor<2x3x8xf32>, tensor<4x8xf32>, tensor<4xf32>) -> tensor<2x3x4xf32>
  %relu = aten.relu(%linear) : (tensor<2x3x4xf32>) -> tensor<2x3x4xf32>
  %mul_1 = aten.mul.Tensor(%relu, %_folded_add) : (tensor<2x3x4xf32>, tensor<4xf32>) -> tensor<2x3x4xf32>
  %add_1 = aten.add.Tensor(%mul_1, %relu) : (tensor<2x3x4xf32>, tensor<2x3x4xf32>) -> tensor<2x3x4xf32>
  %masked_fill = aten.masked_fill.Scalar(%add_1, %mask) {value = -10000.0} : (tensor<2x3x4xf32>, tensor<2x3x4xi1>) -> tensor<2x3x4xf32>
  %softmax = aten.softmax.int(%masked_fill) {dim = -1} : (tensor<2x3x4xf32>) -> tensor<2x3x4xf32>
  %sum_1 = aten.sum.dim_IntList(%softmax) {dim = [-1], keepdim = true} : (tensor<2x3x4xf32>) -> tensor<2x3x1xf32>
  %gt = aten.gt.Scalar(%sum_1) {other = 0.5} : (tensor<2x3x1xf32>) -> tensor<2x3x1xi1>
  %to = aten.to.dtype(%gt) {dtype = f16} : (tensor<2x3x1xi1>) -> tensor<2x3x1xf16>
  return %softmax, %to
}
