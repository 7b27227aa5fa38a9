"""Models beyond torchvision's classification zoo: Hugging Face transformers (decoder and encoder
language models, vision and audio models), torchvision's segmentation and video models and (with
``--timm``) timm's image models, each from a tiny configuration or a small input with random
weights (nothing downloads).

For each model:

1. compile it in eval mode, float64, exact statistics (``frontend="auto"``), or report why not;
2. error mode against autograd for a random error at every (flattened) output: the worst relative
   error of any parameter gradient autograd gives (a gradient that is zero up to rounding, a softmax
   key bias, must be zero in ours too), and the parameters autograd reaches that get none;
3. the small-beta limit: the angle between ``dtp``'s update (beta = 1e-6) and ``bp``'s for a mean
   squared error against random targets of every output;
4. one train-mode float32 step of each learner: cross-entropy against random labels when the
   model's first output is (batch, classes), else mean squared error.

It prints a markdown table::

    python examples/more_models.py                       # every model whose package imports
    python examples/more_models.py --models llama,r3d_18
    python examples/more_models.py --timm --models timm/tresnet_m,timm/davit_tiny   # timm's models too
    python examples/more_models.py --wider --timm       # and the wider sweep's (examples/wider_models.py)

transformers, torchvision and timm are not dependencies of fbcompile; the script skips what is missing.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import types

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.frontends import frontend_of
from fbcompile.verify.checks import relative_error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo import import_torchvision  # noqa: E402
from wider_models import WIDER_TIMM, wider_transformers  # noqa: E402
from zoo_checks import LEARNERS, StepTimeout, _short, randomize_zero_parameters, time_limit  # noqa: E402

IDS = (2, 7)          # a batch of two token sequences of length 7
TEXT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=3, pad_token_id=0)


def transformers_models(t) -> dict:
    """name -> () -> (model, example input), from the transformers package ``t``."""
    decoder = dict(TEXT, use_cache=False)
    ids = lambda: torch.randint(1, 50, IDS)  # noqa: E731
    image = lambda: torch.randn(2, 3, 32, 32)  # noqa: E731
    audio = lambda: torch.randn(2, 400)  # noqa: E731
    speech = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
                  conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
                  classifier_proj_size=8, num_labels=3)
    vit = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, num_labels=3)
    specs = {
        "bert": (t.BertForSequenceClassification, t.BertConfig(**TEXT), ids),
        "distilbert": (t.DistilBertForSequenceClassification, t.DistilBertConfig(
            vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=3), ids),
        "albert": (t.AlbertForSequenceClassification, t.AlbertConfig(embedding_size=8, **TEXT), ids),
        "deberta_v2": (t.DebertaV2ForSequenceClassification, t.DebertaV2Config(
            relative_attention=True, pos_att_type=["p2c", "c2p"], max_relative_positions=8, **TEXT), ids),
        "t5_encoder": (t.T5EncoderModel, t.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                                    num_heads=2), ids),
        "gpt2": (t.GPT2ForSequenceClassification, t.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=3, pad_token_id=0,
            use_cache=False), ids),
        "llama": (t.LlamaForSequenceClassification, t.LlamaConfig(num_key_value_heads=1, **decoder), ids),
        "mistral": (t.MistralForSequenceClassification, t.MistralConfig(num_key_value_heads=1, **decoder), ids),
        "qwen2": (t.Qwen2ForSequenceClassification, t.Qwen2Config(num_key_value_heads=1, **decoder), ids),
        "gemma": (t.GemmaForSequenceClassification, t.GemmaConfig(num_key_value_heads=1, head_dim=8, **decoder), ids),
        "phi": (t.PhiForSequenceClassification, t.PhiConfig(**decoder), ids),
        "opt": (t.OPTForSequenceClassification, t.OPTConfig(
            use_cache=False, vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
            max_position_embeddings=32, num_labels=3, pad_token_id=0, word_embed_proj_dim=16), ids),
        "fnet": (t.FNetForSequenceClassification, t.FNetConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=32, max_position_embeddings=32,
            num_labels=3, pad_token_id=0, use_tpu_fourier_optimizations=False), ids),
        "bloom": (t.BloomForSequenceClassification, t.BloomConfig(
            use_cache=False, vocab_size=50, hidden_size=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0), ids),
        "vit": (t.ViTForImageClassification, t.ViTConfig(**vit), image),
        "beit": (t.BeitForImageClassification, t.BeitConfig(use_relative_position_bias=True, **vit), image),
        "dinov2": (t.Dinov2ForImageClassification, t.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            num_labels=3), image),
        "convnextv2": (t.ConvNextV2ForImageClassification, t.ConvNextV2Config(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=3), image),
        "levit": (t.LevitForImageClassification, t.LevitConfig(
            image_size=32, hidden_sizes=[16, 24, 32], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=3), image),
        "mobilevit": (t.MobileViTForImageClassification, t.MobileViTConfig(
            image_size=32, patch_size=2, hidden_sizes=[16, 16, 16], neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16],
            num_attention_heads=2, num_labels=3), image),
        "segformer": (t.SegformerForImageClassification, t.SegformerConfig(
            hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 1, 1],
            decoder_hidden_size=16, num_labels=3), image),
        "poolformer": (t.PoolFormerForImageClassification, t.PoolFormerConfig(
            hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], num_labels=3), image),
        "wav2vec2": (t.Wav2Vec2ForSequenceClassification, t.Wav2Vec2Config(**speech), audio),
        "whisper_encoder": (t.WhisperForAudioClassification, t.WhisperConfig(
            num_mel_bins=8, d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
            max_source_positions=8, classifier_proj_size=8, num_labels=3), lambda: torch.randn(2, 8, 16)),
    }
    return {name: (lambda cls=cls, config=config, make=make: (cls(config), make()))
            for name, (cls, config, make) in specs.items()}


def torchvision_models(models) -> dict:
    seg, video = models.segmentation, models.video
    image, clip = (lambda: torch.randn(2, 3, 32, 32)), (lambda: torch.randn(2, 3, 4, 16, 16))
    return {
        "fcn_resnet50": lambda: (seg.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                  aux_loss=True), image()),
        "deeplabv3_mobilenet_v3": lambda: (seg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                           num_classes=3), image()),
        "lraspp_mobilenet_v3": lambda: (seg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                      num_classes=3), image()),
        "r3d_18": lambda: (video.r3d_18(weights=None, num_classes=3), clip()),
        "mc3_18": lambda: (video.mc3_18(weights=None, num_classes=3), clip()),
        "r2plus1d_18": lambda: (video.r2plus1d_18(weights=None, num_classes=3), clip()),
    }


# timm (pytorch-image-models): architectures with random weights at a small input size (ViTs and
# their kin built for it with img_size; LeViT keeps its 224)
TIMM = {name: 64 for name in (
    "resnet10t", "resnet18d", "ghostnet_050", "lcnet_050", "mobilenetv3_small_050", "regnetx_002", "convnext_atto",
    "efficientnet_b0", "tinynet_e", "rexnet_100", "repvgg_a0", "mobileone_s0", "gernet_s", "dla34", "hardcorenas_a",
    "semnasnet_050", "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mobilevit_xxs", "edgenext_xx_small",
    "poolformer_s12", "resmlp_12_224", "xcit_nano_12_p16_224", "cait_xxs24_224", "pit_ti_224", "coat_lite_tiny",
    "fastvit_t8", "efficientvit_b0", "gcvit_xxtiny", "maxvit_nano_rw_256", "coatnet_nano_rw_224", "nf_resnet26",
    "resnest14d", "skresnet18", "ecaresnet26t", "gcresnet33ts", "halonet26t", "botnet26t_256", "lambda_resnet26t",
    "tresnet_m", "ese_vovnet19b_slim_dw", "selecsls42b", "hrnet_w18_small", "ghostnetv2_100", "repghostnet_050",
    "mobilenetv4_conv_small", "volo_d1_224", "mvitv2_tiny", "hiera_tiny_224", "davit_tiny", "focalnet_tiny_srf",
    "nest_tiny", "twins_svt_small", "efficientformerv2_s0", "tiny_vit_5m_224", "inception_next_tiny", "rdnet_tiny",
    "mambaout_femto", "flexivit_small", "deit3_small_patch16_224", "sequencer2d_s")}
TIMM.update({"levit_128s": 224, "eva02_tiny_patch14_224": 56, "vit_small_patch14_reg4_dinov2": 56,
             "halonet26t": 256})   # halo attention needs sizes divisible by its block (64: the model asserts)


def timm_models(sizes: dict = TIMM) -> dict:
    """"timm/<name>" -> () -> (model, example input) for the names of ``sizes`` (name -> input size),
    when timm is installed."""
    try:
        import timm
    except ImportError:
        print("timm is not installed: its models are skipped")
        return {}

    def build(name, size):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=3, img_size=size)
        except TypeError:                   # a convnet: no img_size argument
            model = timm.create_model(name, pretrained=False, num_classes=3)
        return model, torch.randn(2, 3, size, size)
    return {f"timm/{name}": (lambda name=name, size=size: build(name, size)) for name, size in sizes.items()}


def available_models(with_timm: bool = False, wider: bool = False) -> dict:
    """The models of the packages installed; ``wider`` adds those of :mod:`wider_models`."""
    found = {}
    if "torchvision" not in sys.modules:    # transformers imports torchvision; a CUDA wheel's ops do not load
        sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    try:
        import transformers
        transformers.logging.set_verbosity_error()
        found.update(transformers_models(transformers))
        found.update(wider_transformers(transformers) if wider else {})
    except ImportError:
        print("transformers is not installed: its models are skipped")
    models = import_torchvision()
    if models is None:
        print("torchvision is not installed: its models are skipped")
    else:
        found.update(torchvision_models(models))
    if with_timm:
        found.update(timm_models({**TIMM, **WIDER_TIMM} if wider else TIMM))
    return found


def tensors(out) -> list:
    """The output tensors in pytree order (what a compiled program returns)."""
    out = out.to_tuple() if hasattr(out, "to_tuple") else out
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]


def as_list(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def error_mode(model, program, x) -> tuple:
    """(worst relative parameter error, parameters autograd reaches that got no gradient)."""
    outs = tensors(model(x))
    errors = [torch.randn_like(o) for o in outs]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = torch.autograd.grad(sum((o * e).sum() for o, e in zip(outs, errors)), [p for _, p in named],
                                    allow_unused=True)
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, errors[0] if len(errors) == 1 else tuple(errors))
    scale = max(float(g.norm()) for g in reference if g is not None)
    worst, missing = 0.0, []
    for (name, p), g in zip(named, reference):
        if g is None:
            continue
        if p.grad is None:
            missing += [name] if float(g.norm()) > 1e-12 * scale else []
        elif float(g.norm()) < 1e-12 * scale:          # zero up to rounding: ours must be too
            worst = max(worst, float(p.grad.norm()) / scale)
        else:
            worst = max(worst, relative_error(p.grad, g))
    return worst, missing


def mse_to(targets):
    return lambda out, _: sum(F.mse_loss(o, t) for o, t in zip(as_list(out), targets))


def small_beta_angle(model, program, x) -> float:
    targets = [torch.randn_like(o) for o in tensors(model(x))]
    updates = []
    for algorithm, options in (("bp", {}), ("dtp", {"beta": 1e-6})):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, **options).step(x, None, mse_to(targets))
        updates.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    cosine = float(updates[0] @ updates[1] / (updates[0].norm() * updates[1].norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


def learner_outcomes(base, x, learners, step_timeout) -> dict:
    outcomes = {}
    model = copy.deepcopy(base).float().train()
    x = x.float() if x.is_floating_point() else x
    try:
        program = fbcompile.compile(model, x)
    except FBCompileError as exc:
        return {a: f"refused: {_short(exc, 120)}" for a in learners}
    first = tensors(model(x))[0]
    if first.dim() == 2:
        target, loss = torch.randint(0, first.shape[1], (first.shape[0],)), lambda out, y: F.cross_entropy(as_list(out)[0], y)
    else:
        targets = [torch.randn_like(o) for o in tensors(model(x))]
        target, loss = torch.zeros(first.shape[0]), mse_to(targets)
    for algorithm in learners:
        try:
            with time_limit(step_timeout):
                learner = fbcompile.learner(program, algorithm, seed=0)
                model.zero_grad(set_to_none=True)
                learner.step(x, target, loss)
            finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
            outcomes[algorithm] = "ok" if finite else "non-finite gradient"
        except FBCompileError as exc:
            outcomes[algorithm] = f"refused: {_short(exc, 120)}"
        except StepTimeout as exc:
            outcomes[algorithm] = f"timeout: {exc}"
        except Exception as exc:  # noqa: BLE001  (a crash is reported, not hidden)
            outcomes[algorithm] = f"CRASH: {type(exc).__name__}: {_short(exc, 120)}"
    return outcomes


def check(name, build, learners, step_timeout) -> dict:
    torch.manual_seed(0)
    base, x = build()
    row = {"model": name, "front end": "-", "error mode": "-", "angle": "-", "learners": {}}
    model = copy.deepcopy(base).double().eval()
    randomize_zero_parameters(model)
    x64 = x.double() if x.is_floating_point() else x
    try:
        program = fbcompile.compile(model, x64, variants=("exact-statistics",))
    except FBCompileError as exc:
        row["error mode"] = f"refused: {_short(exc, 160)}"
        return row
    row["front end"] = frontend_of(program.traced)[0]
    worst, missing = error_mode(model, program, x64)
    row["error mode"] = f"{worst:.1e}" + (f", no gradient for {', '.join(missing[:3])}" if missing else "")
    row["angle"] = f"{small_beta_angle(model, program, x64):.1e} deg"
    row["learners"] = learner_outcomes(base, x, learners, step_timeout)
    return row


def table(rows) -> str:
    lines = ["| model | front end | error mode vs autograd (float64) | small-beta angle | learners |", "|---|---|---|---|---|"]
    for r in rows:
        ok = [a for a, v in r["learners"].items() if v == "ok"]
        others = "; ".join(f"{a}: {v}" for a, v in r["learners"].items() if v != "ok")
        learners = f"{len(ok)}/{len(r['learners'])}" + (f" ({others})" if others else "") if r["learners"] else "-"
        lines.append(f"| {r['model']} | {r['front end']} | {r['error mode']} | {r['angle']} | "
                     f"{learners.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="", help="comma-separated names (default: all available)")
    parser.add_argument("--learners", default=",".join(LEARNERS))
    parser.add_argument("--step-timeout", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timm", action="store_true", help="add timm's models (timm/<name>) to those available")
    parser.add_argument("--wider", action="store_true", help="add the wider sweep's models (examples/wider_models.py)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    found = available_models(args.timm, args.wider)
    names = [n for n in args.models.split(",") if n] or list(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        parser.error(f"unknown or unavailable model(s): {', '.join(unknown)}; available: {', '.join(found)}")
    rows = []
    for name in names:
        rows.append(check(name, found[name], [a for a in args.learners.split(",") if a], args.step_timeout))
        print(f"  {name}: {rows[-1]['error mode']}, {rows[-1]['angle']}", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
