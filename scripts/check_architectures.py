"""Which transformers architectures headprune prunes exactly, which it refuses, and which go wrong.

For each model type named, a tiny random model is built from its config (no weights, nothing
downloaded); headprune finds its attention heads or refuses it in one line; then every other head
is closed by the gates and, on a copy, removed, and the two models' outputs on one random input
are compared. A model type whose tiny config cannot be built here, or whose tiny model cannot run
on the random input, is reported as such (not a verdict on headprune). Run it after a transformers
upgrade: a model type that matches a layout but gives other outputs once pruned, or fails in
removal, is a bug to fix or a layout to refuse (headprune/sites.py).

    python scripts/check_architectures.py bert llama olmo2 led          # or --all-known
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings

import torch
import transformers
from transformers import AutoConfig

from headprune import attach_gates, detach_gates
from headprune.errors import UnsupportedArchitectureError
from headprune.pruning import remove_heads

# Tiny sizes under every name configs use for them (each config takes the ones it knows), and wide random
# weights, so that every head, and a wrong slice of anything per head, shows in the outputs
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99, d_model=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
            decoder_ffn_dim=37, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, d_ff=37, n_embd=32, n_layer=2,
            n_head=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, image_size=32,
            patch_size=8, initializer_range=0.3, init_std=0.3)
# Types with settings of their own: sizes per stage (Swin), experts whose grouped matrix products want
# aligned widths (GPT-OSS), the option that gives each head its own query and key norm (Cohere), BEiT's and
# Data2Vec's position biases (a table per layer and one shared by the layers)
SWIN = dict(image_size=16, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2)
TOWER = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=2, num_attention_heads=4)  # CLIP's, SigLIP's
TOWERS = dict(vision_config={**TOWER, "image_size": 16, "patch_size": 8}, text_config=TOWER)
BIASES = {**TINY, "use_relative_position_bias": True, "use_shared_relative_position_bias": True}
# Attention over blocks, with inputs long enough for several: BigBird's block-sparse attention (at 8
# tokens it falls back to full attention), LongT5's local and transient-global blocks of 3 tokens
BLOCKS = {"big_bird": dict(attention_type="block_sparse", block_size=4, num_random_blocks=1,
                           max_position_embeddings=128),
          "longt5": dict(local_radius=2, global_block_size=4, encoder_attention_type="transient-global")}
LENGTH = {"big_bird": 64, "longt5": 16}  # tokens of the random input (8 for the others)
PER_TYPE = {"swin": SWIN, "swinv2": SWIN, "beit": BIASES, "data2vec-vision": BIASES,
            "clip": TOWERS, "siglip": TOWERS, "cohere": {**TINY, "use_qk_norm": True},
            "gpt_oss": {**TINY, "intermediate_size": 64, "num_local_experts": 2, "num_experts_per_tok": 1},
            **{model_type: {**TINY, **settings} for model_type, settings in BLOCKS.items()}}
# The first that has a model for the type (an encoder-decoder's with its three kinds of heads)
AUTO_CLASSES = ("AutoModelForSeq2SeqLM", "AutoModelForSpeechSeq2Seq", "AutoModelForCausalLM",
                "AutoModelForSequenceClassification", "AutoModelForImageClassification", "AutoModel")
# The model types the layouts are known for, then lookalikes and others refused (the default list)
KNOWN = ["bert", "roberta", "xlm-roberta", "electra", "distilbert", "big_bird", "deberta", "deberta-v2",
         "modernbert", "bart", "mbart", "marian", "pegasus", "t5", "longt5", "whisper", "m2m_100", "llama",
         "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "cohere", "gpt_oss", "phi3", "gpt2",
         "gpt_bigcode", "gpt_neox", "opt", "olmo", "vit", "deit", "beit", "swin", "clip", "siglip",
         "olmo2", "diffllama", "bitnet", "nystromformer", "convbert", "led", "fsmt", "mvp", "pegasus_x",
         "layoutlmv3", "swinv2", "data2vec-vision", "albert", "bloom", "phi"]


def tiny_model(model_type: str):
    config = AutoConfig.for_model(model_type, **PER_TYPE.get(model_type, TINY))
    errors = []
    for name in AUTO_CLASSES:
        torch.manual_seed(0)  # the same random weights every run
        try:
            model = getattr(transformers, name).from_config(config).eval()
        except Exception as err:  # this auto class has no model for the type: try the next
            errors.append(f"{name}: {type(err).__name__}")
            continue
        with torch.no_grad():  # what starts at zero (biases, position bias tables) would hide a wrong slice
            for p in model.parameters():
                if p.is_floating_point() and not p.any():
                    p.normal_(0.0, 0.5)
        return model
    raise ValueError("; ".join(errors))


def random_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    if model.main_input_name == "pixel_values":  # (CLIP, SigLIP: the vision tower's config)
        config = getattr(model.config, "vision_config", model.config)
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=g)}
    if model.main_input_name == "input_features":  # speech: log-mel frames of the length it expects
        frames = 2 * getattr(model.config, "max_source_positions", 1500)
        inputs = {"input_features": torch.randn(2, model.config.num_mel_bins, frames, generator=g)}
        return {**inputs, "decoder_input_ids": torch.randint(3, 90, (2, 4), generator=g)}
    ids = torch.randint(3, 90, (2, LENGTH.get(model.config.model_type, 8)), generator=g)
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :4]
    return inputs


def output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def check(model_type: str) -> tuple[str, str]:
    """(verdict, detail): supported, refused, mismatch, removal fails, or not built here."""
    try:
        model = tiny_model(model_type)
    except Exception as err:
        return "not built here", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    try:
        gates = attach_gates(model)
    except UnsupportedArchitectureError as err:
        return "refused", str(err)[:160]
    kept = [head for i, head in enumerate(gates.heads) if i % 2 == 0]
    gates.set_mask(torch.tensor([float(head in kept) for head in gates.heads]))
    try:
        inputs = random_inputs(model)
        expected = output_of(model, inputs)
    except Exception as err:
        return "not built here", f"the tiny model does not run on a random input: {type(err).__name__}"
    finally:
        detach_gates(model)
    try:
        got = output_of(remove_heads(copy.deepcopy(model), kept), inputs)
    except Exception as err:
        return "removal fails", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    diff = (got - expected).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if diff > 1e-4 * scale:
        return "mismatch", f"outputs differ by {diff:.3g}"
    return "supported", f"{len(gates.sites)} attention blocks, {gates.num_heads} heads; pruned = masked (max {diff:.1g})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_types", nargs="*", help="transformers model types (config.model_type)")
    parser.add_argument("--all-known", action="store_true", help=f"the {len(KNOWN)} types of the default list")
    args = parser.parse_args(argv)
    types = args.model_types or (KNOWN if args.all_known else [])
    if not types:
        parser.error("name model types, or --all-known")
    print("| model type | verdict | detail |\n|---|---|---|")
    bad = 0
    with warnings.catch_warnings():  # tiny configs warn about their sizes
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            for model_type in types:
                verdict, detail = check(model_type)
                bad += verdict in ("mismatch", "removal fails")
                print(f"| {model_type} | {verdict} | {detail.replace('|', '/')} |", flush=True)
        finally:
            logging.disable(logging.NOTSET)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
