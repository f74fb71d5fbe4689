func @forward(%attention_mask: tensor<2x8xi64>, %input_ids: tensor<2x8xi64>) {
  %embeddings_word_embeddings_weight = param "embeddings.word_embeddings.weight" : tensor<100x32xf32>
  %embeddings_layer_norm_weight = param "embeddings.LayerNorm.weight" : tensor<32xf32>
  %embeddings_layer_norm_bias = param "embeddings.LayerNorm.bias" : tensor<32xf32>
  %encoder_layer_0_attention_self_query_weight = param "encoder.layer.0.attention.self.query.weight" : tensor<32x32xf32>
  %encoder_layer_0_attention_self_query_bias = param "encoder.layer.0.attention.self.query.bias" : tensor<32xf32>
  %encoder_layer_0_attention_self_key_weight = param "encoder.layer.0.attention.self.key.weight" : tensor<32x32xf32>
  %encoder_layer_0_attention_self_key_bias = param "encoder.layer.0.attention.self.key.bias" : tensor<32xf32>
  %encoder_layer_0_attention_self_value_weight = param "encoder.layer.0.attention.self.value.weight" : tensor<32x32xf32>
  %encoder_layer_0_attention_self_value_bias = param "encoder.layer.0.attention.self.value.bias" : tensor<32xf32>
  %encoder_layer_0_attention_output_dense_weight = param "encoder.layer.0.attention.output.dense.weight" : tensor<32x32xf32>
  %encoder_layer_0_attention_output_dense_bias = param "encoder.layer.0.attention.output.dense.bias" : tensor<32xf32>
  %encoder_layer_0_attention_output_layer_norm_weight = param "encoder.layer.0.attention.output.LayerNorm.weight" : tensor<32xf32>
  %encoder_layer_0_attention_output_layer_norm_bias = param "encoder.layer.0.attention.output.LayerNorm.bias" : tensor<32xf32>
  %encoder_layer_0_intermediate_dense_weight = param "encoder.layer.0.intermediate.dense.weight" : tensor<64x32xf32>
  %encoder_layer_0_intermediate_dense_bias = param "encoder.layer.0.intermediate.dense.bias" : tensor<64xf32>
  %encoder_layer_0_output_dense_weight = param "encoder.layer.0.output.dense.weight" : tensor<32x64xf32>
  %encoder_layer_0_output_dense_bias = param "encoder.layer.0.output.dense.bias" : tensor<32xf32>
  %encoder_layer_0_output_layer_norm_weight = param "encoder.layer.0.output.LayerNorm.weight" : tensor<32xf32>
  %encoder_layer_0_output_layer_norm_bias = param "encoder.layer.0.output.LayerNorm.bias" : tensor<32xf32>
  %encoder_layer_1_attention_self_query_weight = param "encoder.layer.1.attention.self.query.weight" : tensor<32x32xf32>
  %encoder_layer_1_attention_self_query_bias = param "encoder.layer.1.attention.self.query.bias" : tensor<32xf32>
  %encoder_layer_1_attention_self_key_weight = param "encoder.layer.1.attention.self.key.weight" : tensor<32x32xf32>
  %encoder_layer_1_attention_self_key_bias = param "encoder.layer.1.attention.self.key.bias" : tensor<32xf32>
  %encoder_layer_1_attention_self_value_weight = param "encoder.layer.1.attention.self.value.weight" : tensor<32x32xf32>
  %encoder_layer_1_attention_self_value_bias = param "encoder.layer.1.attention.self.value.bias" : tensor<32xf32>
  %encoder_layer_1_attention_output_dense_weight = param "encoder.layer.1.attention.output.dense.weight" : tensor<32x32xf32>
  %encoder_layer_1_attention_output_dense_bias = param "encoder.layer.1.attention.output.dense.bias" : tensor<32xf32>
  %encoder_layer_1_attention_output_layer_norm_weight = param "encoder.layer.1.attention.output.LayerNorm.weight" : tensor<32xf32>
  %encoder_layer_1_attention_output_layer_norm_bias = param "encoder.layer.1.attention.output.LayerNorm.bias" : tensor<32xf32>
  %encoder_layer_1_intermediate_dense_weight = param "encoder.layer.1.intermediate.dense.weight" : tensor<64x32xf32>
  %encoder_layer_1_intermediate_dense_bias = param "encoder.layer.1.intermediate.dense.bias" : tensor<64xf32>
  %encoder_layer_1_output_dense_weight = param "encoder.layer.1.output.dense.weight" : tensor<32x64xf32>
  %encoder_layer_1_output_dense_bias = param "encoder.layer.1.output.dense.bias" : tensor<32xf32>
  %encoder_layer_1_output_layer_norm_weight = param "encoder.layer.1.output.LayerNorm.weight" : tensor<32xf32>
  %encoder_layer_1_output_layer_norm_bias = param "encoder.layer.1.output.LayerNorm.bias" : tensor<32xf32>
  %pooler_dense_weight = param "pooler.dense.weight" : tensor<32x32xf32>
  %pooler_dense_bias = param "pooler.dense.bias" : tensor<32xf32>
  %_folded_embedding_1 = param "_folded_embedding_1" : tensor<2x8x32xf32>
  %_folded_embedding_2 = param "_folded_embedding_2" : tensor<1x8x32xf32>
  %_folded_unsqueeze_2 = param "_folded_unsqueeze_2" : tensor<2x1x1x1xi64>
  %_folded_unsqueeze_11 = param "_folded_unsqueeze_11" : tensor<1x1x1x8xi64>
  %_folded_and_1 = param "_folded_and_1" : tensor<1x1x8x1xi1>
  %embedding = aten.embedding(%embeddings_word_embeddings_weight, %input_ids) {padding_idx = 0} : (tensor<100x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  %add = aten.add.Tensor(%embedding, %_folded_embedding_1) : (tensor<2x8x32xf32>, tensor<2x8x32xf32>) -> tensor<2x8x32xf32>
  %add_1 = aten.add.Tensor(%add, %_folded_embedding_2) : (tensor<2x8x32xf32>, tensor<1x8x32xf32>) -> tensor<2x8x32xf32>
  %layer_norm = aten.layer_norm(%add_1, %embeddings_layer_norm_weight, %embeddings_layer_norm_bias) {normalized_shape = [32], eps = 1e-12, cudnn_enable = false} : (tensor<2x8x32xf32>, tensor<32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  %to = aten.to.device(%attention_mask) {device = "cpu", dtype = i1} : (tensor<2x8xi64>) -> tensor<2x8xi1>
  %index = aten.index.Tensor(%to, [%_folded_unsqueeze_2, %_folded_unsqueeze_11]) : (tensor<2x8xi1>, (tensor<2x1x1x1xi64>, tensor<1x1x1x8xi64>)) -> tensor<2x1x1x8xi1>
  %to_2 = aten.to.dtype_layout(%index) {dtype = i1, layout = strided, device = "cpu"} : (tensor<2x1x1x8xi1>) -> tensor<2x1x1x8xi1>
  %and_2 = aten.__and__.Tensor(%_folded_and_1, %to_2) : (tensor<1x1x8x1xi1>, tensor<2x1x1x8xi1>) -> tensor<2x1x8x8xi1>
  %expand_2 = aten.expand(%and_2) {size = [2, -1, 8, 8]} : (tensor<2x1x8x8xi1>) -> tensor<2x1x8x8xi1>
  %linear = aten.linear(%layer_norm, %encoder_layer_0_attention_self_query_weight, %encoder_layer_0_attention_self_query_bias) : (tensor<2x8x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  %view = aten.view(%linear) {size = [2, 8, -1, 8]} : (tensor<2x8x32xf32>) -> tensor<2x8x4x8xf32>
  %transpose = aten.transpose.int(%view) {dim0 = 1, dim1 = 2} : (tensor<2x8x4x8xf32>) -> tensor<2x4x8x8xf32>
  %linear_1 = aten.linear(%layer_norm, %encoder_layer_0_attention_self_key_weight, %encoder_layer_0_attention_self_key_bias) : (tensor<2x8x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  %view_1 = aten.view(%linear_1) {size = [2, 8, -1, 8]} : (tensor<2x8x32xf32>) -> tensor<2x8x4x8xf32>
  %transpose_1 = aten.transpose.int(%view_1) {dim0 = 1, dim1 = 2} : (tensor<2x8x4x8xf32>) -> tensor<2x4x8x8xf32>
  %linear_2 = aten.linear(%layer_norm, %encoder_layer_0_attention_self_value_weight, %encoder_layer_0_attention_self_value_bias) : (tensor<2x8x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  %view_2 = aten.view(%linear_2) {size = [2, 8, -1, 8]} : (tensor<2x8x32xf32>) -> tensor<2x8x4x8xf32>
  %transpose_2 = aten.transpose.int(%view_2) {dim0 = 1, dim1 = 2} : (tensor<2x8x4x8xf32>) -> tensor<2x4x8x8xf32>
  %tome_key_weights = tx.tome_key_weights(%transpose_1, %expand_2) : (tensor<2x4x8x8xf32>, tensor<2x1x8x8xi1>) -> tensor<2x8xf32>
  %scaled_dot_product_attention = aten.scaled_dot_product_attention(%transpose, %transpose_1, %transpose_2, %expand_2) {scale = 0.3535533905932738} : (tensor<2x4x8x8xf32>, tensor<2x4x8x8xf32>, tensor<2x4x8x8xf32>, tensor<2x1x8x8xi1>) -> tensor<2x4x8x8xf32>
  %reshape = aten.reshape(%scaled_dot_product_attention) {shape = [2, -1, 8, 8]} : (tensor<2x4x8x8xf32>) -> tensor<2x4x8x8xf32>
  %transpose_3 = aten.transpose.int(%reshape) {dim0 = 1, dim1 = 2} : (tensor<2x4x8x8xf32>) -> tensor<2x8x4x8xf32>
  %reshape_1 = aten.reshape(%transpose_3) {shape = [2, 8, -1]} : (tensor<2x8x4x8xf32>) -> tensor<2x8x32xf32>
  %linear_3 = aten.linear(%reshape_1, %encoder_layer_0_attention_output_dense_weight, %encoder_layer_0_attention_output_dense_bias) : (tensor<2x8x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x8x32xf32>
  %add_4 = aten.add.Tensor(%linear_3, %layer_norm) : (tensor<2x8x32xf32>, tensor<2x8x32xf32>) -> tensor<2x8x32xf32>
  %tome_match = tx.tome_match(%transpose_1, %tome_key_weights) {r = 2, protect_first = true} : (tensor<2x4x8x8xf32>, tensor<2x8xf32>) -> tensor<2x8xi64>
  %tome_merge = tx.tome_merge(%add_4, %tome_key_weights, %tome_match) {tokens = 6} : (tensor<2x8x32xf32>, tensor<2x8xf32>, tensor<2x8xi64>) -> tensor<2x6x32xf32>
  %tome_sizes = tx.tome_sizes(%tome_key_weights, %tome_match) {tokens = 6} : (tensor<2x8xf32>, tensor<2x8xi64>) -> tensor<2x6xf32>
  %tome_compose = tx.tome_compose(%tome_match) : (tensor<2x8xi64>) -> tensor<2x8xi64>
  %layer_norm_1 = aten.layer_norm(%tome_merge, %encoder_layer_0_attention_output_layer_norm_weight, %encoder_layer_0_attention_output_layer_norm_bias) {normalized_shape = [32], eps = 1e-12, cudnn_enable = false} : (tensor<2x6x32xf32>, tensor<32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %linear_4 = aten.linear(%layer_norm_1, %encoder_layer_0_intermediate_dense_weight, %encoder_layer_0_intermediate_dense_bias) : (tensor<2x6x32xf32>, tensor<64x32xf32>, tensor<64xf32>) -> tensor<2x6x64xf32>
  %gelu = aten.gelu(%linear_4) : (tensor<2x6x64xf32>) -> tensor<2x6x64xf32>
  %linear_5 = aten.linear(%gelu, %encoder_layer_0_output_dense_weight, %encoder_layer_0_output_dense_bias) : (tensor<2x6x64xf32>, tensor<32x64xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %add_5 = aten.add.Tensor(%linear_5, %layer_norm_1) : (tensor<2x6x32xf32>, tensor<2x6x32xf32>) -> tensor<2x6x32xf32>
  %layer_norm_2 = aten.layer_norm(%add_5, %encoder_layer_0_output_layer_norm_weight, %encoder_layer_0_output_layer_norm_bias) {normalized_shape = [32], eps = 1e-12, cudnn_enable = false} : (tensor<2x6x32xf32>, tensor<32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %linear_6 = aten.linear(%layer_norm_2, %encoder_layer_1_attention_self_query_weight, %encoder_layer_1_attention_self_query_bias) : (tensor<2x6x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %view_3 = aten.view(%linear_6) {size = [2, 6, 4, 8]} : (tensor<2x6x32xf32>) -> tensor<2x6x4x8xf32>
  %transpose_4 = aten.transpose.int(%view_3) {dim0 = 1, dim1 = 2} : (tensor<2x6x4x8xf32>) -> tensor<2x4x6x8xf32>
  %linear_7 = aten.linear(%layer_norm_2, %encoder_layer_1_attention_self_key_weight, %encoder_layer_1_attention_self_key_bias) : (tensor<2x6x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %view_4 = aten.view(%linear_7) {size = [2, 6, 4, 8]} : (tensor<2x6x32xf32>) -> tensor<2x6x4x8xf32>
  %transpose_5 = aten.transpose.int(%view_4) {dim0 = 1, dim1 = 2} : (tensor<2x6x4x8xf32>) -> tensor<2x4x6x8xf32>
  %linear_8 = aten.linear(%layer_norm_2, %encoder_layer_1_attention_self_value_weight, %encoder_layer_1_attention_self_value_bias) : (tensor<2x6x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %view_5 = aten.view(%linear_8) {size = [2, 6, 4, 8]} : (tensor<2x6x32xf32>) -> tensor<2x6x4x8xf32>
  %transpose_6 = aten.transpose.int(%view_5) {dim0 = 1, dim1 = 2} : (tensor<2x6x4x8xf32>) -> tensor<2x4x6x8xf32>
  %tome_bias = tx.tome_bias(%tome_sizes) {dtype = f32} : (tensor<2x6xf32>) -> tensor<2x1x1x6xf32>
  %scaled_dot_product_attention_1 = aten.scaled_dot_product_attention(%transpose_4, %transpose_5, %transpose_6, %tome_bias) {scale = 0.3535533905932738} : (tensor<2x4x6x8xf32>, tensor<2x4x6x8xf32>, tensor<2x4x6x8xf32>, tensor<2x1x1x6xf32>) -> tensor<2x4x6x8xf32>
  %reshape_2 = aten.reshape(%scaled_dot_product_attention_1) {shape = [2, 4, 6, 8]} : (tensor<2x4x6x8xf32>) -> tensor<2x4x6x8xf32>
  %transpose_7 = aten.transpose.int(%reshape_2) {dim0 = 1, dim1 = 2} : (tensor<2x4x6x8xf32>) -> tensor<2x6x4x8xf32>
  %reshape_3 = aten.reshape(%transpose_7) {shape = [2, 6, 32]} : (tensor<2x6x4x8xf32>) -> tensor<2x6x32xf32>
  %linear_9 = aten.linear(%reshape_3, %encoder_layer_1_attention_output_dense_weight, %encoder_layer_1_attention_output_dense_bias) : (tensor<2x6x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x6x32xf32>
  %add_6 = aten.add.Tensor(%linear_9, %layer_norm_2) : (tensor<2x6x32xf32>, tensor<2x6x32xf32>) -> tensor<2x6x32xf32>
  %tome_match_1 = tx.tome_match(%transpose_5, %tome_sizes) {r = 2, protect_first = true} : (tensor<2x4x6x8xf32>, tensor<2x6xf32>) -> tensor<2x6xi64>
  %tome_merge_1 = tx.tome_merge(%add_6, %tome_sizes, %tome_match_1) {tokens = 4} : (tensor<2x6x32xf32>, tensor<2x6xf32>, tensor<2x6xi64>) -> tensor<2x4x32xf32>
  %tome_compose_1 = tx.tome_compose(%tome_compose, %tome_match_1) : (tensor<2x8xi64>, tensor<2x6xi64>) -> tensor<2x8xi64>
  %layer_norm_3 = aten.layer_norm(%tome_merge_1, %encoder_layer_1_attention_output_layer_norm_weight, %encoder_layer_1_attention_output_layer_norm_bias) {normalized_shape = [32], eps = 1e-12, cudnn_enable = false} : (tensor<2x4x32xf32>, tensor<32xf32>, tensor<32xf32>) -> tensor<2x4x32xf32>
  %linear_10 = aten.linear(%layer_norm_3, %encoder_layer_1_intermediate_dense_weight, %encoder_layer_1_intermediate_dense_bias) : (tensor<2x4x32xf32>, tensor<64x32xf32>, tensor<64xf32>) -> tensor<2x4x64xf32>
  %gelu_1 = aten.gelu(%linear_10) : (tensor<2x4x64xf32>) -> tensor<2x4x64xf32>
  %linear_11 = aten.linear(%gelu_1, %encoder_layer_1_output_dense_weight, %encoder_layer_1_output_dense_bias) : (tensor<2x4x64xf32>, tensor<32x64xf32>, tensor<32xf32>) -> tensor<2x4x32xf32>
  %add_7 = aten.add.Tensor(%linear_11, %layer_norm_3) : (tensor<2x4x32xf32>, tensor<2x4x32xf32>) -> tensor<2x4x32xf32>
  %layer_norm_4 = aten.layer_norm(%add_7, %encoder_layer_1_output_layer_norm_weight, %encoder_layer_1_output_layer_norm_bias) {normalized_shape = [32], eps = 1e-12, cudnn_enable = false} : (tensor<2x4x32xf32>, tensor<32xf32>, tensor<32xf32>) -> tensor<2x4x32xf32>
  %tome_unmerge = tx.tome_unmerge(%layer_norm_4, %tome_compose_1) : (tensor<2x4x32xf32>, tensor<2x8xi64>) -> tensor<2x8x32xf32>
  %select = aten.select.int(%tome_unmerge) {dim = 1, index = 0} : (tensor<2x8x32xf32>) -> tensor<2x32xf32>
  %linear_12 = aten.linear(%select, %pooler_dense_weight, %pooler_dense_bias) : (tensor<2x32xf32>, tensor<32x32xf32>, tensor<32xf32>) -> tensor<2x32xf32>
  %tanh = aten.tanh(%linear_12) : (tensor<2x32xf32>) -> tensor<2x32xf32>
  return %tome_unmerge, %tanh
}
