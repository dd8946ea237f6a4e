"""How much smaller and faster a pruned model is than its original, measured side by side.

Parameters are counted; FLOPs by torch's FLOP counter on one forward pass: the total, and the
attention's part (what the attention sites' modules compute). Latency is
measured by alternating the two models on the same random batch (original, pruned, original, ...)
so that machine noise hits both alike; the median over repeats is reported with its spread
(interquartile range) and a warning where the spread is large, throughput, the speedup and the
speedup the FLOP ratio predicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from .config import MeasureConfig
from .errors import ConfigError, OutputExistsError, require
from .outputs import cache_root, check_not_inside, check_writable, keep_json
from .sites import UNIT_NAMES, find_sites

log = logging.getLogger("headprune")

NOISY = 0.10  # a spread (IQR) above this fraction of the median makes a speedup uncertain


def kv_cache_bytes_per_token(model, unit: str = "group") -> int:
    """Bytes the key/value cache of generation holds per token (per sequence): keys and values of
    every decoder self-attention layer, in the weights' dtype (cross-attention caches grow with
    the source, not with the generated tokens)."""
    return sum(2 * site.kv_heads * site.head_dim * site.key.weight.element_size()
               for site in find_sites(model, unit) if site.kind == "decoder")


def is_generator(model) -> bool:
    """A model that generates (a translation model, a language model): its generation is timed. An
    encoder-decoder classifier (T5ForSequenceClassification) does not."""
    return type(model).can_generate()


def is_image_model(model) -> bool:
    return getattr(model, "main_input_name", "input_ids") == "pixel_values"


def image_tokens(config) -> int:
    """The tokens an image becomes: its patches and the class token (DeiT: and its distillation
    token; Swin: none, and it attends within windows, merging patches between stages)."""
    return (config.image_size // config.patch_size) ** 2 + {"deit": 2, "swin": 0}.get(config.model_type, 1)


def sequence_length(model, length: int) -> int:
    """The length a model's attention sees: `length` tokens up to its positions, or an image's tokens."""
    if is_image_model(model):
        return image_tokens(model.config)
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(length, positions) if isinstance(positions, int) else length


def forward_inputs(model, ids: torch.Tensor) -> dict:
    """A forward pass's inputs; an encoder-decoder reads the same length on both sides; an image
    model reads `ids` as its pixels."""
    if is_image_model(model):
        return {"pixel_values": ids}
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if model.config.is_encoder_decoder:
        inputs["decoder_input_ids"] = ids
    return inputs


def counted_flops(model, batch: int, length: int, unit: str = "group") -> dict[str, int]:
    """The FLOPs of one forward pass on a batch of random inputs, by torch's FLOP counter (matrix
    products, 2 a multiply-add): `total`, and `attention`, what the attention sites' modules compute
    (projections, the two attention products and whatever else is theirs: DeBERTa's relative
    positions, Swin's windows), each module counted once."""
    ids = random_inputs(batch, length, model.config, next(model.parameters()).device, seed=0)
    counter = FlopCounterMode(display=False)
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the counter does not see inside SDPA's CPU kernel
    # the counter's module tracker hooks inputs that need a gradient, and fails on a weight fed to a
    # module as it is (DeBERTa's relative embeddings): no weight needs one here
    needs_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.no_grad(), counter:
            model(**forward_inputs(model, ids))
    finally:
        model.set_attn_implementation(kernel)
        for p, flag in zip(model.parameters(), needs_grad):
            p.requires_grad_(flag)
    # the counter names a module by its path from the model, under the model's class name
    root = type(model).__name__
    names = {id(module): f"{root}.{name}" if name else root for name, module in model.named_modules()}
    counts = counter.get_flop_counts()

    def flops(module) -> int:  # (a module's count includes its children's)
        return sum(counts.get(names.get(id(module)), {}).values())
    attention = 0
    for site in find_sites(model, unit):
        inside = {id(m) for m in site.attention.modules()}
        apart = {id(m): m for m in (site.query, site.key, site.value, site.output) if id(m) not in inside}
        attention += flops(site.attention) + sum(flops(m) for m in apart.values())
    return {"total": counter.get_total_flops(), "attention": attention}


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def size_facts(model, unit: str, length: int) -> dict:
    """A model's size: parameters, the attention's FLOPs for one sequence of `length` tokens (one
    image), counted on a forward pass, and (models that generate) the key/value cache per generated token."""
    facts = {"parameters": parameters(model)}
    try:  # (eager attention on one sequence: a long --max-length on a full GPU could run out of memory)
        facts["attention_flops"] = counted_flops(model, 1, length, unit)["attention"]
    except torch.OutOfMemoryError:
        log.warning("the attention FLOPs of one sequence of %d tokens were not counted (out of memory): the model "
                    "card leaves them out", length)
    if is_generator(model):
        facts["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model, unit)
    return facts


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def spread(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of a list of timings."""
    if len(times) == 1:
        q1 = q3 = times[0]
    else:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "min": min(times), "max": max(times)}


@torch.no_grad()
def alternate(models: dict, run, repeats: int, warmup: int, device: str) -> dict[str, dict]:
    """Seconds of `run(model)` for each model (median, quartiles, min, max), the models taking
    turns so that machine noise hits them alike."""
    times = {name: [] for name in models}
    for i in range(warmup + repeats):
        for name, model in models.items():
            _sync(device)
            start = time.perf_counter()
            run(model)
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: spread(ts) for name, ts in times.items()}


def random_inputs(batch: int, length: int, config, device, seed: int) -> torch.Tensor:
    """Random token ids; for an image model (a config with an image size) random pixels of its size."""
    g = torch.Generator().manual_seed(seed)
    if getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
        return torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=g).to(device)
    ids = torch.randint(5, config.vocab_size, (batch, length), generator=g)
    eos = getattr(config, "eos_token_id", None)
    if config.is_encoder_decoder and isinstance(eos, int):  # T5's classifier reads the end token
        ids[:, -1] = eos
    return ids.to(device)


def time_side_by_side(models: dict, batch: int, length: int, repeats: int, warmup: int, device: str,
                      config) -> dict[str, dict]:
    """One forward pass of each model on one random batch, taking turns."""
    ids = random_inputs(batch, length, config, device, seed=0)
    return alternate(models, lambda model: model(**forward_inputs(model, ids)), repeats, warmup, device)


def time_generation(models: dict, batch: int, length: int, new_tokens: int, beams: int, repeats: int,
                    warmup: int, device: str, config) -> dict[str, dict]:
    """Generating exactly `new_tokens` tokens (beam search or greedy) from one random batch of
    `length` tokens (the source of an encoder-decoder, the prompt of a decoder-only model), each
    model in turn, so that both do the same work."""
    ids = random_inputs(batch, length, config, device, seed=1)
    return alternate(models, lambda model: model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, early_stopping=False), repeats, warmup, device)


def time_forward_or_generation(models: dict, batch: int, length: int, new_tokens: int | None, repeats: int,
                               warmup: int, device: str, config) -> dict[str, dict]:
    """As a speed budget is timed: one forward pass of `batch` x `length`, or with `new_tokens`
    generating that many greedily from a prompt (source) of `length` tokens; the models taking turns."""
    if new_tokens:
        return time_generation(models, batch, length, new_tokens, 1, repeats, warmup, device, config)
    return time_side_by_side(models, batch, length, repeats, warmup, device, config)


def load_models(cfg: MeasureConfig) -> dict:
    """The pruned model and its original (the same architecture at full size, unless --original)."""
    from transformers import AutoConfig

    from .pruning import SAFE, SAFE_WEIGHTS, load_pruned, model_class_of, model_from_config
    from .tasks import Task
    from .tasks.base import loading_weights

    pruned = load_pruned(cfg.pruned, attn_implementation=cfg.attn_implementation)
    cls = model_class_of(pruned.config)
    if cfg.original:
        path, config = Task().model_config(cfg.original)  # a local folder is checked first: no code, no pickle
        check_original(cfg, pruned.config, config)
        if (getattr(config, "headprune", None) or {}).get("physical"):
            raise ConfigError(f"--original {cfg.original} is a pruned model itself: give the model "
                              f"{cfg.pruned} was pruned from")
        with loading_weights(f"--original {cfg.original}"):
            original = cls.from_pretrained(path, attn_implementation=cfg.attn_implementation, **SAFE_WEIGHTS)
    else:
        config = AutoConfig.from_pretrained(cfg.pruned, attn_implementation=cfg.attn_implementation, **SAFE)
        original = model_from_config(cls, config)  # in the pruned model's dtype
    return {"original": original.eval().to(cfg.device), "pruned": pruned.eval().to(cfg.device)}


def check_original(cfg: MeasureConfig, pruned, original) -> None:
    """--original must be the model the pruned one came from: the same architecture, vocabulary,
    width, layers and heads (both run on the same random inputs, and the pruned model's record
    numbers its heads in the original's shape)."""
    plain = getattr(pruned, "headprune_source", None) is not None  # export --format transformers: fewer heads a layer

    def shape(config):
        text = config.get_text_config()
        return {"model": config.model_type, "vocabulary": getattr(text, "vocab_size", None), "width": getattr(text, "hidden_size", None),
                "layers": getattr(text, "num_hidden_layers", None),
                **({} if plain else {"heads": getattr(text, "num_attention_heads", None)})}
    differs = {name: (value, shape(original)[name]) for name, value in shape(pruned).items()
               if value != shape(original)[name]}
    if differs:
        raise ConfigError(f"--original {cfg.original} is not the model {cfg.pruned} was pruned from: "
                          + ", ".join(f"{name} {theirs} (pruned model: {ours})" for name, (ours, theirs) in differs.items()))


MEASURE_FILES = ("measure.json", "measure.md")  # what --output-dir gets


def measure(cfg: MeasureConfig, progress=print) -> dict:
    if cfg.pruned is None:
        raise ConfigError("give the pruned model's folder with --pruned")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device on this machine (is a CUDA build of torch installed?)")
    held = [name for name in MEASURE_FILES if cfg.output_dir and (Path(cfg.output_dir) / name).exists()]
    if held and not cfg.overwrite:
        raise OutputExistsError(f"{cfg.output_dir} already holds {held[0]}; pass --overwrite "
                                "or choose another --output-dir")
    if cfg.output_dir:
        check_not_inside(Path(cfg.output_dir), {"pruned model": cfg.pruned, "original model": cfg.original})
        check_writable(Path(cfg.output_dir))
    if not (Path(cfg.pruned) / "config.json").is_file():
        raise ConfigError(f"--pruned {cfg.pruned}: no such model folder (with a config.json)")
    if cfg.card:
        check_writable(Path(cfg.pruned))  # before the timings, not after
    from .pruning import load_pruned_config, model_class_of
    config = load_pruned_config(cfg.pruned)
    if getattr(config, "headprune_source", None) is not None and not cfg.original:
        raise ConfigError(f"--pruned {cfg.pruned} is a plain export (its config holds the pruned head counts): give "
                          "--original, the model it was pruned from")
    positions = getattr(config, "max_position_embeddings", None)
    if positions and max(cfg.lengths) > positions:
        raise ConfigError(f"--lengths {max(cfg.lengths)}: longer than the model's {positions} positions")
    cls = model_class_of(config)
    generates = cls.can_generate() and not config.is_encoder_decoder  # (an encoder-decoder's source: no limit)
    if positions and generates and max(cfg.lengths) + cfg.generate_tokens > positions:
        raise ConfigError(f"--lengths {max(cfg.lengths)} and --generate-tokens {cfg.generate_tokens}: longer than "
                          f"the model's {positions} positions, which a prompt and what is generated from it share")
    if cfg.runtime == "onnxruntime":
        from .export import classifier_kind
        require("onnx", "onnxruntime", "onnxscript", extra="onnx")
        if cfg.device != "cpu":
            raise ConfigError("--runtime onnxruntime runs on its CPU provider here: use --device cpu")
        if classifier_kind(config) is None:
            raise ConfigError("--runtime onnxruntime measures encoder classifiers of text or images so far (what "
                              "headprune export writes); use --runtime torch for this model")
    if cfg.attn_implementation == "sdpa" and not getattr(cls, "_supports_sdpa", True):
        progress(f"{cls.__name__} has no sdpa attention in transformers: both models run eager attention")
        cfg = dataclasses.replace(cfg, attn_implementation="eager")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    models = load_models(cfg)
    sessions = None
    if cfg.runtime == "onnxruntime":
        import tempfile

        from .export import check_exportable, onnx_sessions
        check_exportable(models["pruned"], cfg.pruned)
        progress("exporting both models to ONNX")
        with tempfile.TemporaryDirectory(prefix="headprune-measure-") as folder:  # a session holds its graph
            sessions = onnx_sessions(models, Path(folder), cfg.threads)
    original = models["original"]
    unit = (getattr(models["pruned"].config, "headprune", None) or {}).get("unit", "group")
    sites = {name: find_sites(m, unit) for name, m in models.items()}
    heads = {name: sum(s.num_heads for s in found) for name, found in sites.items()}
    result = {"heads": heads, "unit": sites["original"][0].unit, "parameters": {n: parameters(m) for n, m in models.items()},
              "device": cfg.device, "threads": torch.get_num_threads(),
              "attn_implementation": cfg.attn_implementation, "runtime": cfg.runtime, "settings": [], "generation": []}
    if not original.config.is_encoder_decoder and is_generator(original):
        result["kv_cache_bytes_per_token"] = {n: kv_cache_bytes_per_token(m, unit) for n, m in models.items()}
    # an image model's sequence is its patches: one length, whatever --lengths says
    lengths = [image_tokens(original.config)] if is_image_model(original) else cfg.lengths
    total = len(cfg.batch_sizes) * len(lengths) * (1 + len(cfg.beams) * is_generator(original))
    # each setting's row is kept as it is measured: a measurement stopped midway measures only the settings left
    partial = cache_root() / "measure" / f"{_key(cfg, models, lengths)}.json"
    kept, writable, done = _read_rows(partial), True, []
    if kept:
        progress(f"{len(kept)} of {total} settings measured before, by a measurement stopped midway ({partial})")

    def measured(setting: str, compute) -> dict:
        nonlocal writable
        if setting not in kept:
            kept[setting] = compute()
            writable = writable and keep_json(partial, kept, "a stopped measurement starts over")  # (said once)
        done.append(setting)
        return kept[setting]

    def said(line: str, row: dict) -> None:  # a setting measured: "[i/N] ..."
        warning = f"; warning: {row['note']}" if row["note"].startswith("noisy") else ""
        progress(f"[{len(done)}/{total}] {line}: speedup {row['speedup']:.2f}x (FLOPs predict "
                 f"{row['predicted_speedup']:.2f}x){warning}")
    for batch in cfg.batch_sizes:
        for length in lengths:
            row = measured(f"batch {batch} length {length}",
                           lambda: _forward_row(cfg, models, sessions, batch, length, unit))
            result["settings"].append(row)
            said(f"batch {batch:3d} length {length:4d}", row)
            if is_generator(original):
                for beams in cfg.beams:
                    generation = measured(f"batch {batch} length {length} beams {beams}",
                                          lambda: _generation_row(cfg, models, batch, length, beams, row))
                    result["generation"].append(generation)
                    said(f"generate batch {batch:3d} source {length:4d} beam {beams}", generation)
    partial.unlink(missing_ok=True)  # whole: the next measurement times everything again
    return result


def _forward_row(cfg, models, sessions, batch: int, length: int, unit: str) -> dict:
    original = models["original"]
    counted = {n: counted_flops(m, batch, length, unit) for n, m in models.items()}
    flops = {n: c["total"] for n, c in counted.items()}
    attn = {n: c["attention"] for n, c in counted.items()}
    if sessions is None:
        timings = time_side_by_side(models, batch, length, cfg.repeats, cfg.warmup, cfg.device, original.config)
    else:
        from .export import example_inputs  # the graph's inputs (segments too, where it takes them)
        feeds = {name: t.numpy() for name, t in example_inputs(original, batch, length, seed=0).items()}
        timings = alternate(sessions, lambda session: session.run(None, feeds), cfg.repeats, cfg.warmup, "cpu")
    seconds = {n: t["median"] for n, t in timings.items()}
    row = {"batch": batch, "length": length, "flops": flops, "attention_flops": attn,
           "seconds": seconds, "timings": timings,
           "throughput": {n: batch / s for n, s in seconds.items()},
           "speedup": seconds["original"] / seconds["pruned"],
           "predicted_speedup": flops["original"] / flops["pruned"]}
    row["note"] = _note(cfg.device, batch, row["predicted_speedup"], timings)
    return row


def timing_machine(device: str) -> list:
    """What a timing kept in the cache was made on: the GPU's model, or the host and the threads
    (a cache shared by machines, a home folder on a network disk, keeps each one's own)."""
    return [torch.cuda.get_device_name()] if device == "cuda" else [platform.node(), torch.get_num_threads()]


def _key(cfg: MeasureConfig, models: dict, lengths: list[int]) -> str:
    """What a measurement's rows depend on: both models' configs and dtypes, the settings, the machine."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("pruned", "original", "output_dir",
                                                                              "overwrite", "card")}
    what = [{n: [m.config.to_dict(), str(next(m.parameters()).dtype)] for n, m in models.items()}, settings, lengths,
            timing_machine(cfg.device), torch.__version__, transformers.__version__]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _read_rows(path: Path) -> dict:
    try:
        rows = json.loads(path.read_text()) if path.is_file() else {}
        return rows if isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values()) else {}
    except (OSError, ValueError):
        return {}  # a damaged record: its settings are measured again


def _generation_row(cfg, models, batch, length, beams, forward_row) -> dict:
    timings = time_generation(models, batch, length, cfg.generate_tokens, beams, cfg.repeats, cfg.warmup,
                              cfg.device, models["original"].config)
    seconds = {n: t["median"] for n, t in timings.items()}
    row = {"batch": batch, "length": length, "beams": beams, "new_tokens": cfg.generate_tokens,
           "seconds": seconds, "timings": timings,
           "tokens_per_second": {n: batch * cfg.generate_tokens / s for n, s in seconds.items()},
           "speedup": seconds["original"] / seconds["pruned"],
           "predicted_speedup": forward_row["predicted_speedup"]}
    row["note"] = _note(cfg.device, batch, row["predicted_speedup"], timings)
    return row


def _note(device: str, batch: int, predicted: float, timings: dict) -> str:
    noisy = [f"{n} {(t['q3'] - t['q1']) / t['median']:.0%}" for n, t in timings.items()
             if (t["q3"] - t["q1"]) > NOISY * t["median"]]
    if noisy:
        return f"noisy machine: interquartile range {', '.join(noisy)} of the median; repeat with more --repeats"
    if predicted < 1.02:
        return "almost nothing removed: no speedup to expect"
    if device.startswith("cuda") and batch == 1:
        return "batch 1 on a GPU is bound by kernel launches, not FLOPs: little speedup to expect"
    return ""


def _rate(per_second: float) -> str:
    """Whole numbers, with a decimal below 10 (a 135M model on one CPU thread: 2.3 sequences/s)."""
    return f"{per_second:.1f}" if per_second < 10 else f"{per_second:.0f}"


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def markdown(result: dict) -> str:
    p, h = result["parameters"], result["heads"]
    kv = result.get("kv_cache_bytes_per_token")
    cache = (f"; KV cache {kv['original']:,} -> {kv['pruned']:,} bytes per token ({kv['pruned'] / kv['original']:.1%})"
             if kv else "")
    lines = [f"{_upper_first(UNIT_NAMES[result.get('unit', 'head')])} {h['original']} -> {h['pruned']}; parameters "
             f"{p['original']:,} -> {p['pruned']:,} ({p['pruned'] / p['original']:.1%}){cache}; "
             f"{result['device']}, {result['threads']} thread{'s' * (result['threads'] != 1)}, "
             + ("ONNX Runtime (CPU provider; FLOPs counted on the torch models)." if result.get("runtime") == "onnxruntime"
                else f"{result['attn_implementation']} attention."), "",
             "| batch | length | GFLOPs orig | GFLOPs pruned | attention share | ms orig (IQR) "
             "| ms pruned (IQR) | seq/s orig | seq/s pruned | speedup | FLOP-predicted | measured / predicted | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["settings"]:
        share = r["attention_flops"]["original"] / r["flops"]["original"]
        lines.append(
            f"| {r['batch']} | {r['length']} | {_gflops(r['flops']['original'])} | {_gflops(r['flops']['pruned'])} "
            f"| {share:.0%} | {_ms(r['timings']['original'])} | {_ms(r['timings']['pruned'])} "
            f"| {_rate(r['throughput']['original'])} | {_rate(r['throughput']['pruned'])} | {r['speedup']:.2f}x "
            f"| {r['predicted_speedup']:.2f}x | {r['speedup'] / r['predicted_speedup']:.2f} | {r['note']} |")
    if result.get("generation"):
        lines += ["", f"Generation: exactly {result['generation'][0]['new_tokens']} new tokens from the same "
                  "random batch (an encoder-decoder's source, a decoder's prompt: `length` above) by each "
                  "model in turn; tokens per second count output tokens of the batch. FLOP prediction: "
                  "one forward pass (the rows above, where a decoder's row is its prefill).", "",
                  "| batch | source/prompt length | beams | ms orig (IQR) | ms pruned (IQR) | tokens/s orig | tokens/s pruned "
                  "| speedup | FLOP-predicted | measured / predicted | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["generation"]:
            lines.append(
                f"| {r['batch']} | {r['length']} | {r['beams']} | {_ms(r['timings']['original'])} "
                f"| {_ms(r['timings']['pruned'])} | {_rate(r['tokens_per_second']['original'])} "
                f"| {_rate(r['tokens_per_second']['pruned'])} | {r['speedup']:.2f}x | {r['predicted_speedup']:.2f}x "
                f"| {r['speedup'] / r['predicted_speedup']:.2f} | {r['note']} |")
    return "\n".join(lines) + "\n"


def _gflops(flops: float) -> str:
    """Three significant figures below 100 GFLOPs (a tiny model's 0.000123, not 0.00), whole ones above."""
    return f"{flops / 1e9:,.0f}" if flops >= 100e9 else f"{flops / 1e9:.3g}"


def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:.1f} ({t['q1'] * 1e3:.1f}-{t['q3'] * 1e3:.1f})"
