func @forward(%x: tensor<1x2x8xf32>) {
  %gelu_default = tx.gelu(%x) {approximate = "tanh"} : (tensor<1x2x8xf32>) -> tensor<1x2x8xf32>
  return %gelu_default
}
