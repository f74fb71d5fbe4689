func @forward(%input_ids: tensor<1x8xi64>, %use_cache: index) {
  %embed_tokens_weight = param "embed_tokens.weight" : tensor<100x64xf32>
  %layers_0_input_layernorm_weight = param "layers.0.input_layernorm.weight" : tensor<64xf32>
  %layers_0_post_attention_layernorm_weight = param "layers.0.post_attention_layernorm.weight" : tensor<64xf32>
  %norm_weight = param "norm.weight" : tensor<64xf32>
  %_folded_unsqueeze_14 = param "_folded_unsqueeze_14" : tensor<1x1x8x16xf32>
  %_folded_unsqueeze_15 = param "_folded_unsqueeze_15" : tensor<1x1x8x16xf32>
  %tp_layers_0_self_attn_q_proj_weight = param "tp_layers_0_self_attn_q_proj_weight" : tensor<32x64xf32>
  %tp_layers_0_self_attn_k_proj_weight = param "tp_layers_0_self_attn_k_proj_weight" : tensor<16x64xf32>
  %tp_layers_0_self_attn_v_proj_weight = param "tp_layers_0_self_attn_v_proj_weight" : tensor<16x64xf32>
  %tp_layers_0_self_attn_o_proj_weight = param "tp_layers_0_self_attn_o_proj_weight" : tensor<64x32xf32>
  %tp_layers_0_mlp_gate_proj_weight = param "tp_layers_0_mlp_gate_proj_weight" : tensor<64x64xf32>
  %tp_layers_0_mlp_up_proj_weight = param "tp_layers_0_mlp_up_proj_weight" : tensor<64x64xf32>
  %tp_layers_0_mlp_down_proj_weight = param "tp_layers_0_mlp_down_proj_weight" : tensor<64x64xf32>
  %embedding = aten.embedding(%embed_tokens_weight, %input_ids) : (tensor<100x64xf32>, tensor<1x8xi64>) -> tensor<1x8x64xf32>
  %to_6 = aten.to.dtype(%embedding) {dtype = f32} : (tensor<1x8x64xf32>) -> tensor<1x8x64xf32>
  %rms_norm_default_2 = tx.rms_norm(%embedding, %layers_0_input_layernorm_weight) {eps = 1e-06} : (tensor<1x8x64xf32>, tensor<64xf32>) -> tensor<1x8x64xf32>
  %linear = aten.linear(%rms_norm_default_2, %tp_layers_0_self_attn_q_proj_weight) : (tensor<1x8x64xf32>, tensor<32x64xf32>) -> tensor<1x8x32xf32>
  %view = aten.view(%linear) {size = [1, 8, 2, 16]} : (tensor<1x8x32xf32>) -> tensor<1x8x2x16xf32>
  %transpose = aten.transpose.int(%view) {dim0 = 1, dim1 = 2} : (tensor<1x8x2x16xf32>) -> tensor<1x2x8x16xf32>
  %linear_1 = aten.linear(%rms_norm_default_2, %tp_layers_0_self_attn_k_proj_weight) : (tensor<1x8x64xf32>, tensor<16x64xf32>) -> tensor<1x8x16xf32>
  %view_1 = aten.view(%linear_1) {size = [1, 8, 1, 16]} : (tensor<1x8x16xf32>) -> tensor<1x8x1x16xf32>
  %transpose_1 = aten.transpose.int(%view_1) {dim0 = 1, dim1 = 2} : (tensor<1x8x1x16xf32>) -> tensor<1x1x8x16xf32>
  %linear_2 = aten.linear(%rms_norm_default_2, %tp_layers_0_self_attn_v_proj_weight) : (tensor<1x8x64xf32>, tensor<16x64xf32>) -> tensor<1x8x16xf32>
  %view_2 = aten.view(%linear_2) {size = [1, 8, 1, 16]} : (tensor<1x8x16xf32>) -> tensor<1x8x1x16xf32>
  %transpose_2 = aten.transpose.int(%view_2) {dim0 = 1, dim1 = 2} : (tensor<1x8x1x16xf32>) -> tensor<1x1x8x16xf32>
  %rotary_default = tx.rotary(%transpose, %_folded_unsqueeze_14, %_folded_unsqueeze_15) : (tensor<1x2x8x16xf32>, tensor<1x1x8x16xf32>, tensor<1x1x8x16xf32>) -> tensor<1x2x8x16xf32>
  %rotary_default_1 = tx.rotary(%transpose_1, %_folded_unsqueeze_14, %_folded_unsqueeze_15) : (tensor<1x1x8x16xf32>, tensor<1x1x8x16xf32>, tensor<1x1x8x16xf32>) -> tensor<1x1x8x16xf32>
  %attention_default_1 = tx.attention(%rotary_default, %rotary_default_1, %transpose_2) {scale = 0.25, is_causal = true} : (tensor<1x2x8x16xf32>, tensor<1x1x8x16xf32>, tensor<1x1x8x16xf32>) -> tensor<1x2x8x16xf32>
  %reshape_2 = aten.reshape(%attention_default_1) {shape = [1, 2, 8, 16]} : (tensor<1x2x8x16xf32>) -> tensor<1x2x8x16xf32>
  %transpose_3 = aten.transpose.int(%reshape_2) {dim0 = 1, dim1 = 2} : (tensor<1x2x8x16xf32>) -> tensor<1x8x2x16xf32>
  %reshape_3 = aten.reshape(%transpose_3) {shape = [1, 8, 32]} : (tensor<1x8x2x16xf32>) -> tensor<1x8x32xf32>
  %linear_3 = aten.linear(%reshape_3, %tp_layers_0_self_attn_o_proj_weight) : (tensor<1x8x32xf32>, tensor<64x32xf32>) -> tensor<1x8x64xf32>
  %all_reduce_rms_norm_default = tx.all_reduce_rms_norm(%linear_3, %to_6, %layers_0_post_attention_layernorm_weight) {eps = 1e-06, group = "", impl = "auto", site = 0} : (tensor<1x8x64xf32>, tensor<1x8x64xf32>, tensor<64xf32>) -> (tensor<1x8x64xf32>, tensor<1x8x64xf32>)
  %getitem = get %all_reduce_rms_norm_default[0] : tensor<1x8x64xf32>
  %getitem_1 = get %all_reduce_rms_norm_default[1] : tensor<1x8x64xf32>
  %to_8 = aten.to.dtype(%getitem_1) {dtype = f32} : (tensor<1x8x64xf32>) -> tensor<1x8x64xf32>
  %linear_4 = aten.linear(%getitem, %tp_layers_0_mlp_gate_proj_weight) : (tensor<1x8x64xf32>, tensor<64x64xf32>) -> tensor<1x8x64xf32>
  %linear_5 = aten.linear(%getitem, %tp_layers_0_mlp_up_proj_weight) : (tensor<1x8x64xf32>, tensor<64x64xf32>) -> tensor<1x8x64xf32>
  %gated_act_default = tx.gated_act(%linear_4, %linear_5) {act = "silu"} : (tensor<1x8x64xf32>, tensor<1x8x64xf32>) -> tensor<1x8x64xf32>
  %linear_6 = aten.linear(%gated_act_default, %tp_layers_0_mlp_down_proj_weight) : (tensor<1x8x64xf32>, tensor<64x64xf32>) -> tensor<1x8x64xf32>
  %all_reduce_rms_norm_default_1 = tx.all_reduce_rms_norm(%linear_6, %to_8, %norm_weight) {eps = 1e-06, group = "", impl = "auto", site = 1} : (tensor<1x8x64xf32>, tensor<1x8x64xf32>, tensor<64xf32>) -> (tensor<1x8x64xf32>, tensor<1x8x64xf32>)
  %getitem_2 = get %all_reduce_rms_norm_default_1[0] : tensor<1x8x64xf32>
  return %getitem_2
}
