func @forward(%x: tensor<1x2x8xf32>) {
  %weight = param "weight" : tensor<8xf32>
  %rms_norm_default_2 = tx.rms_norm(%x, %weight) {eps = 1e-06} : (tensor<1x2x8xf32>, tensor<8xf32>) -> tensor<1x2x8xf32>
  %rms_norm_default_3 = tx.rms_norm(%rms_norm_default_2) {eps = 1e-05} : (tensor<1x2x8xf32>) -> tensor<1x2x8xf32>
  return %rms_norm_default_2, %rms_norm_default_3
}
