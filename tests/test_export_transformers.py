"""Hugging Face models from tiny configurations (no weights downloaded) through the torch.export
front end: BERT, GPT-2, ViT and the decoder families (Llama, Mistral, Qwen2, Gemma, Phi, OPT,
GPT-Neo, Bloom), T5's encoder and DeBERTa-v2 compile with the default frontend="auto", error mode
equals autograd in float64 for every parameter autograd reaches, and the learners step in train
mode. transformers is not a dependency: the test is skipped when it does not import."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.frontends import frontend_of
from fbcompile.verify.checks import relative_error
from helpers import randomise_vectors

# a CUDA torchvision wheel beside CPU torch fails in its meta registrations; transformers imports it
if "torchvision" not in sys.modules:
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
transformers = pytest.importorskip("transformers")


DECODERS = dict(use_cache=False, vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32, num_labels=3, pad_token_id=0)
FAMILIES = {
    "llama": lambda: transformers.LlamaForSequenceClassification(transformers.LlamaConfig(num_key_value_heads=1,
                                                                                         **DECODERS)),
    "mistral": lambda: transformers.MistralForSequenceClassification(
        transformers.MistralConfig(num_key_value_heads=1, **DECODERS)),
    "qwen2": lambda: transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(num_key_value_heads=1,
                                                                                         **DECODERS)),
    "gemma": lambda: transformers.GemmaForSequenceClassification(
        transformers.GemmaConfig(num_key_value_heads=1, head_dim=8, **DECODERS)),
    "phi": lambda: transformers.PhiForSequenceClassification(transformers.PhiConfig(**DECODERS)),
    "opt": lambda: transformers.OPTForSequenceClassification(transformers.OPTConfig(
        use_cache=False, vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        max_position_embeddings=32, num_labels=3, pad_token_id=0, word_embed_proj_dim=16)),
    "gpt_neo": lambda: transformers.GPTNeoForSequenceClassification(transformers.GPTNeoConfig(
        use_cache=False, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, window_size=4,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=32, num_labels=3, pad_token_id=0)),
    "bloom": lambda: transformers.BloomForSequenceClassification(transformers.BloomConfig(
        use_cache=False, vocab_size=50, hidden_size=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)),
    "deberta_v2": lambda: transformers.DebertaV2ForSequenceClassification(transformers.DebertaV2Config(
        relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8, **DECODERS)),
    "t5_encoder": lambda: transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2)),
}
NAMES = ["bert", "gpt2", "vit", *FAMILIES]
# Bloom computes its attention softmax in float32 inside a float64 model: autograd and the compiled
# feedback round those float32 values in different orders (with the softmax in the model's dtype
# they agree to 1e-13), so its gradients are compared at float32's resolution
FLOAT32_INSIDE = {"bloom": 1e-6}


def _build(name):
    if name in FAMILIES:
        return FAMILIES[name](), torch.randint(1, 50, (2, 7))
    if name == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=32, num_labels=3)
        return transformers.BertForSequenceClassification(config), torch.randint(1, 50, (2, 7))
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=3,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=1, use_cache=False)
        return transformers.GPT2ForSequenceClassification(config), torch.randint(1, 50, (2, 7))
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    return transformers.ViTForImageClassification(config), torch.randn(2, 3, 8, 8)


def _logits(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.parametrize("name", NAMES)
def test_error_mode_equals_autograd_in_float64(name):
    torch.manual_seed(0)
    model, x = _build(name)
    model = randomise_vectors(model.double().eval())
    x = x.double() if x.is_floating_point() else x
    program = fbcompile.compile(model, x)
    assert frontend_of(program.traced)[0] == "export"
    error = torch.randn_like(_logits(model(x)))
    named = [(n, p) for n, p in model.named_parameters()]
    reference = torch.autograd.grad((_logits(model(x)) * error).sum(), [p for _, p in named], allow_unused=True)
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, error)
    scale = max(float(g.norm()) for g in reference if g is not None)
    for (n, p), g in zip(named, reference):
        if g is None:
            continue
        assert p.grad is not None, n
        if float(g.norm()) < 1e-12 * scale:     # zero up to rounding (a key bias under softmax): ours too
            assert float(p.grad.norm()) < 1e-10 * scale, n
        else:
            assert relative_error(p.grad, g) < FLOAT32_INSIDE.get(name, 1e-8), n


@pytest.mark.parametrize("name", NAMES)
def test_bp_dtp_dfa_and_mf_step_in_train_mode(name):
    torch.manual_seed(1)
    model, x = _build(name)
    model.train()
    program = fbcompile.compile(model, x)
    classifier = _logits(model(x)).dim() == 2
    loss = (lambda out, y: F.cross_entropy(_logits(out), y)) if classifier else (lambda out, t: F.mse_loss(out, t))
    target = torch.tensor([0, 2]) if classifier else torch.randn_like(_logits(model(x)))
    for algorithm in ("bp", "dtp", "dfa", "mf") if classifier else ("bp", "dtp", "dfa"):
        learner = fbcompile.learner(program, algorithm, seed=0)
        model.zero_grad(set_to_none=True)
        learner.step(x, target, loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
