"""The wider sweep of ``examples/more_models.py --wider``: 101 more timm architectures and 50 more
Hugging Face configurations, tiny or at a small input, random weights (nothing downloads).

    python examples/more_models.py --wider --timm --learners bp,dtp,dfa,drtp,mf --threads 1

Each timm name maps to its input size (64 unless the architecture needs its own: windows of 7,
blocks of 8 or 16, a fixed 224 or 256); each Hugging Face name to a model class, a configuration
class, the configuration's arguments and an input maker.
"""
from __future__ import annotations

import torch

WIDER_TIMM = {name: 64 for name in (
    "test_byobnet", "test_efficientnet_evos", "test_efficientnet_gn", "test_efficientnet_ln", "test_nfnet",
    "test_vit_relpos", "test_vit2", "test_vit3", "test_vit4", "test_convnext2", "test_convnext3", "caformer_s18",
    "convformer_s18", "convit_tiny", "cs3darknet_s", "cspresnet50", "darknet17", "densenet121", "dla46x_c",
    "dpn48b", "eca_nfnet_l0", "efficientvim_m1", "fasternet_t0", "fbnetc_100", "fbnetv3_b", "gmixer_12_224",
    "gmlp_ti16_224", "beit_base_patch16_224", "vgg11", "mobilenet_edgetpu_100", "efficientnetv2_rw_t",
    "spnasnet_100", "hgnet_tiny", "hgnetv2_b0", "hieradet_small", "iformer_t", "lcnetv2_small", "lowformer_b0",
    "mixnet_s", "mnasnet_050", "mobilenetv1_100", "mobilevitv2_050", "nextvit_small", "pvt_v2_b0", "regnety_002",
    "regnetz_005", "repvit_m1", "res2net50_14w_8s", "resnetv2_18", "sedarknet21", "shvit_s1", "starnet_s1",
    "swiftformer_xs", "tnt_s_patch16_224", "visformer_tiny", "vitamin_small_224", "xception41", "cpubone_t0",
    "csatv2", "convmixer_768_32", "resnet51q", "resnetblur18", "nf_regnet_b0", "legacy_seresnet18",
    "legacy_xception", "vit_base_patch16_rope_reg1_gap_256", "naflexvit_base_patch16_gap",
    "vit_small_patch16_18x2_224", "vit_base_patch16_siglip_224", "vit_tiny_r_s16_p8_224", "vit_small_resnet26d_224",
    "deit_tiny_distilled_patch16_224", "beitv2_base_patch16_224", "beit3_base_patch16_224", "tf_efficientnet_b0",
    "tf_mixnet_s", "tf_mobilenetv3_small_minimal_100", "resnetv2_50x1_bit", "convnextv2_atto", "poolformerv2_s12",
    "mixer_b16_224", "seresnext26d_32x4d", "resnetrs50", "mobilenetv5_300m", "sam2_hiera_tiny", "fastvit_mci0")}
WIDER_TIMM.update({"crossvit_tiny_240": 240, "inception_v4": 96, "maxxvit_rmlp_nano_rw_256": 256,
                   "swin_tiny_patch4_window7_224": 224, "swinv2_cr_tiny_ns_224": 224, "efficientformer_l1": 224,
                   "coatnext_nano_rw_224": 224, "maxxvitv2_nano_rw_256": 256, "lambda_resnet26rpt_256": 256,
                   "halo2botnet50ts_256": 256, "sehalonet33ts": 256, "efficientvit_m0": 224, "levit_conv_128s": 224,
                   "swinv2_tiny_window8_256": 256, "swin_s3_tiny_224": 224})

_TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=32, num_labels=3, pad_token_id=0)
_DECODER = dict(_TEXT, use_cache=False)
_AUDIO = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
              conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
              classifier_proj_size=8, num_labels=3)
_VISION = dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2)


def _ids():
    return torch.randint(1, 50, (2, 7))


def _eos_ids():
    """BART's classifier pools at the end-of-sequence token (id 2): one per sequence, last."""
    return torch.cat([torch.randint(3, 50, (2, 6)), torch.full((2, 1), 2)], 1)


def _image():
    return torch.randn(2, 3, 32, 32)


def _audio():
    return torch.randn(2, 400)


#: name -> (model class name, configuration class name, configuration arguments, input maker)
WIDER_TRANSFORMERS = {
    "roberta": ("RobertaForSequenceClassification", "RobertaConfig", dict(_TEXT, pad_token_id=1), _ids),
    "electra": ("ElectraForSequenceClassification", "ElectraConfig", dict(_TEXT, embedding_size=8), _ids),
    "mobilebert": ("MobileBertForSequenceClassification", "MobileBertConfig",
                   dict(_TEXT, embedding_size=8, intra_bottleneck_size=8, true_hidden_size=8,
                        num_feedforward_networks=2), _ids),
    "funnel": ("FunnelForSequenceClassification", "FunnelConfig",
               dict(vocab_size=50, block_sizes=[1, 1], d_model=16, n_head=2, d_head=8, d_inner=32, num_labels=3), _ids),
    "convbert": ("ConvBertForSequenceClassification", "ConvBertConfig", dict(_TEXT, embedding_size=16), _ids),
    "squeezebert": ("SqueezeBertForSequenceClassification", "SqueezeBertConfig",
                    dict(_TEXT, embedding_size=16, q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2,
                         intermediate_groups=2, output_groups=2), _ids),
    "mpnet": ("MPNetForSequenceClassification", "MPNetConfig", _TEXT, _ids),
    "roformer": ("RoFormerForSequenceClassification", "RoFormerConfig", dict(_TEXT, embedding_size=16), _ids),
    "xlnet": ("XLNetForSequenceClassification", "XLNetConfig",
              dict(vocab_size=50, d_model=16, n_layer=2, n_head=2, d_inner=32, num_labels=3, use_mems_train=False,
                   mem_len=None), _ids),
    "gptj": ("GPTJForSequenceClassification", "GPTJConfig",
             dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32, num_labels=3,
                  pad_token_id=0, use_cache=False), _ids),
    "gpt_neox": ("GPTNeoXForSequenceClassification", "GPTNeoXConfig", _DECODER, _ids),
    "falcon": ("FalconForSequenceClassification", "FalconConfig",
               dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
                    pad_token_id=0, use_cache=False), _ids),
    "falcon_alibi": ("FalconForSequenceClassification", "FalconConfig",
                     dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
                          pad_token_id=0, use_cache=False, alibi=True), _ids),
    "gemma2": ("Gemma2ForSequenceClassification", "Gemma2Config", dict(_DECODER, num_key_value_heads=1, head_dim=8),
               _ids),
    "phi3": ("Phi3ForSequenceClassification", "Phi3Config", dict(_DECODER, num_key_value_heads=1), _ids),
    "qwen3": ("Qwen3ForSequenceClassification", "Qwen3Config", dict(_DECODER, num_key_value_heads=1, head_dim=8),
              _ids),
    "stablelm": ("StableLmForSequenceClassification", "StableLmConfig", dict(_DECODER, num_key_value_heads=1), _ids),
    "gpt_bigcode": ("GPTBigCodeForSequenceClassification", "GPTBigCodeConfig",
                    dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0,
                         use_cache=False), _ids),
    "mixtral": ("MixtralForSequenceClassification", "MixtralConfig",
                dict(_DECODER, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2), _ids),
    "bart": ("BartForSequenceClassification", "BartConfig",
             dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                  num_labels=3, use_cache=False), _eos_ids),
    "esm": ("EsmForSequenceClassification", "EsmConfig", dict(_TEXT, pad_token_id=1, position_embedding_type="rotary"),
            _ids),
    "biogpt": ("BioGptForSequenceClassification", "BioGptConfig", _DECODER, _ids),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                  num_labels=3), _image),
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig",
                 dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3), _image),
    "resnet_hf": ("ResNetForImageClassification", "ResNetConfig",
                  dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3), _image),
    "clip_vision": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", dict(_VISION, projection_dim=8), _image),
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", _VISION, _image),
    "hubert": ("HubertForSequenceClassification", "HubertConfig", _AUDIO, _audio),
    "perceiver": ("PerceiverForSequenceClassification", "PerceiverConfig",
                  dict(vocab_size=50, d_model=16, num_latents=4, d_latents=16, num_blocks=1,
                       num_self_attends_per_block=1, num_self_attention_heads=2, num_cross_attention_heads=2,
                       max_position_embeddings=32, num_labels=3), _ids),
    "mamba": ("MambaForCausalLM", "MambaConfig",
              dict(vocab_size=50, hidden_size=16, state_size=4, num_hidden_layers=2, use_cache=False), _ids),
    "nystromformer": ("NystromformerForSequenceClassification", "NystromformerConfig",
                      dict(_TEXT, num_landmarks=7, segment_means_seq_len=7), _ids),
    "gpt_neo": ("GPTNeoForSequenceClassification", "GPTNeoConfig",
                dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, attention_types=[[["global", "local"], 1]],
                     window_size=4, max_position_embeddings=32, num_labels=3, pad_token_id=0, use_cache=False), _ids),
    "codegen": ("CodeGenForCausalLM", "CodeGenConfig",
                dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, rotary_dim=4, n_positions=32, use_cache=False), _ids),
    "openai_gpt": ("OpenAIGPTForSequenceClassification", "OpenAIGPTConfig",
                   dict(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0), _ids),
    "xglm": ("XGLMForCausalLM", "XGLMConfig",
             dict(vocab_size=50, d_model=16, num_layers=2, attention_heads=2, ffn_dim=32, max_position_embeddings=32,
                  use_cache=False), _ids),
    "starcoder2": ("Starcoder2ForSequenceClassification", "Starcoder2Config", dict(_DECODER, num_key_value_heads=1),
                   _ids),
    "olmo": ("OlmoForCausalLM", "OlmoConfig", dict(_DECODER, num_key_value_heads=1), _ids),
    "granite": ("GraniteForCausalLM", "GraniteConfig", dict(_DECODER, num_key_value_heads=1), _ids),
    "cohere": ("CohereForCausalLM", "CohereConfig", dict(_DECODER, num_key_value_heads=1), _ids),
    "persimmon": ("PersimmonForSequenceClassification", "PersimmonConfig", _DECODER, _ids),
    "mbart": ("MBartForSequenceClassification", "MBartConfig",
              dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                   num_labels=3, use_cache=False), _eos_ids),
    "data2vec_text": ("Data2VecTextForSequenceClassification", "Data2VecTextConfig", dict(_TEXT, pad_token_id=1), _ids),
    "vit_msn": ("ViTMSNForImageClassification", "ViTMSNConfig", dict(_VISION, num_labels=3), _image),
    "data2vec_vision": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
                        dict(_VISION, num_labels=3, use_relative_position_bias=True), _image),
    "deit_distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", dict(_VISION, num_labels=3), _image),
    "regnet_hf": ("RegNetForImageClassification", "RegNetConfig",
                  dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3), _image),
    "mobilenet_v2_hf": ("MobileNetV2ForImageClassification", "MobileNetV2Config",
                        dict(image_size=32, depth_multiplier=0.35, num_labels=3), _image),
    "pvt_hf": ("PvtForImageClassification", "PvtConfig",
               dict(image_size=32, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
                    num_labels=3), _image),
    "recurrent_gemma": ("RecurrentGemmaForCausalLM", "RecurrentGemmaConfig",
                        dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=32, lru_width=16, attention_window_size=4, head_dim=8, use_cache=False),
                        _ids),
    "rwkv": ("RwkvForCausalLM", "RwkvConfig",
             dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, attention_hidden_size=16, intermediate_size=32,
                  context_length=32, use_cache=False), _ids),
}


def wider_transformers(t) -> dict:
    """name -> () -> (model, example input), from the transformers package ``t`` (a configuration
    this version of transformers lacks is left out)."""
    found = {}
    for name, (model_class, config_class, arguments, make) in WIDER_TRANSFORMERS.items():
        if hasattr(t, model_class) and hasattr(t, config_class):
            found[name] = (lambda m=model_class, c=config_class, a=arguments, make=make:
                           (getattr(t, m)(getattr(t, c)(**a)), make()))
    return found
