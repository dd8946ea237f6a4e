"""llama.cpp runs a pruned Llama-family model (issue 22): its GGUF export against PyTorch.

Exports the pruned model (a folder saved by headprune) and the model it was pruned from (--base;
default: offline:smollm2-135m's float32 folder) to float32 GGUF with `headprune export --format
gguf`, loads both in llama.cpp through llama-cpp-python, and prints
- the greedy tokens of llama.cpp against those of the PyTorch pruned model, on the same prompt
  token ids (--prompts of them, --new-tokens each): equal, or where they first differ;
- the key/value cache llama.cpp allocates for each (from its log, in MiB to two decimals) against
  the prediction from the head counts (with --flash-attention off llama.cpp pads every layer's
  value cache to the widest layer's, so only the keys shrink);
- decoding speed (tokens per second at batch 1, prompt excluded), both models measured in turn
  in this one process, --repeats times.

Not in CI: llama-cpp-python compiles llama.cpp from its PyPI source (about 30 minutes on 2 cores):
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python
Without it the script still exports both files and checks them, then says what is missing.

    python benchmarks/llamacpp.py runs/results/smollm2/dsp-pipelined-k45-s0/model --output-dir runs/results/llamacpp
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from headprune.llamacpp import export_gguf
from headprune.pruning import load_pruned

PROMPTS = [
    "The film is a charming and often affecting journey",
    "Once upon a time, in a small village by the sea,",
    "The three most important things to know about photosynthesis are",
    "def fibonacci(n):",
    "Paris is the capital of France, and Berlin is",
    "The reviewer wrote that the acting was wooden and the plot",
    "To make a good cup of tea, first",
    "In 1969, the first humans to walk on the moon",
]


def kv_cache_mib(log: str) -> float | None:
    """The key/value cache llama.cpp reports allocating ("... KV buffer size = X MiB"), summed."""
    sizes = re.findall(r"KV(?: self)? buffer size\s*=\s*([\d.]+) MiB", log) or re.findall(r"KV self size\s*=\s*([\d.]+) MiB", log)
    return sum(map(float, sizes)) if sizes else None


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (a shorter one differs at its end), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def export(model: str, output: Path, tokenizer_gguf: str | None) -> dict:
    if output.is_file():
        output.unlink()  # this script's own output from an earlier run
    cfg = SimpleNamespace(model=model, output=str(output), overwrite=False, dtype="f32", tokenizer_gguf=tokenizer_gguf)
    return export_gguf(cfg)


def pytorch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def load_llama(path: Path, threads: int, context: int, flash_attention: bool):
    """A llama-cpp-python model and the log text llama.cpp wrote while loading it."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads,
                          n_batch=context, verbose=True, seed=0, flash_attn=flash_attention)
    llm._headprune_log_callback = keep  # keep the callback alive as long as the model
    return llm, "".join(lines)


def llama_greedy(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens from llama.cpp and the seconds spent after the first (decoding only)."""
    llm.reset()
    tokens, start = [], None
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        if start is None:
            start = time.perf_counter()  # the prompt is evaluated before the first token comes
        tokens.append(int(token))
        if len(tokens) == new_tokens:
            break
    return tokens, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pruned", help="a pruned model folder saved by headprune (Llama family)")
    parser.add_argument("--base", default=None, help="the unpruned model folder (default: offline:smollm2-135m's)")
    parser.add_argument("--tokenizer-gguf", default=None, help="see headprune export --format gguf")
    parser.add_argument("--output-dir", required=True, help="where the two GGUF files and llamacpp.json go")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many prompts (at most {len(PROMPTS)})")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flash-attention", choices=["on", "off"], default="on",
                        help="off: llama.cpp pads every layer's value cache to the widest layer's")
    args = parser.parse_args(argv)
    if args.base is None:
        from headprune.tasks.base import smollm2_folder, smollm2_gguf
        args.base = smollm2_folder()
        args.tokenizer_gguf = args.tokenizer_gguf or smollm2_gguf()  # the cached folder has no card to say so
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"pruned": out / "pruned-f32.gguf", "unpruned": out / "unpruned-f32.gguf"}
    exported = {"pruned": export(args.pruned, files["pruned"], args.tokenizer_gguf),
                "unpruned": export(args.base, files["unpruned"], args.tokenizer_gguf)}
    for name, info in exported.items():
        print(f"{name}: {info['output']} ({sum(info['head_count'])} query, {sum(info['head_count_kv'])} key/value heads)")
    model = load_pruned(args.pruned).float().eval()
    tokenizer_folder = args.pruned if (Path(args.pruned) / "tokenizer_config.json").is_file() else args.base
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:args.prompts]]
    expected = [pytorch_greedy(model, p, args.new_tokens) for p in prompts]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SystemExit("llama-cpp-python is not installed: the GGUF files are written and checked; to run them "
                         "in llama.cpp: CMAKE_BUILD_PARALLEL_LEVEL=2 pip install llama-cpp-python") from None
    context = -(-(max(len(p) for p in prompts) + args.new_tokens + 8) // 256) * 256  # llama.cpp pads to 256
    result = {"prompts": len(prompts), "new_tokens": args.new_tokens, "threads": args.threads, "context": context,
              "flash_attention": args.flash_attention}
    models = {}
    for name, path in files.items():
        llm, log = load_llama(path, args.threads, context, args.flash_attention == "on")
        values = exported[name]["kv_cache_values_per_token"]
        models[name] = llm
        result[name] = {"kv_cache_mib": kv_cache_mib(log), "kv_cache_mib_predicted": values * 2 * context / 2**20,
                        "head_count": exported[name]["head_count"], "head_count_kv": exported[name]["head_count_kv"]}
    got = [llama_greedy(models["pruned"], p, args.new_tokens)[0] for p in prompts]
    differences = [first_difference(a, b) for a, b in zip(got, expected)]
    result["same_tokens"] = sum(d is None for d in differences)
    result["first_differences"] = differences
    speed = {name: [] for name in models}
    for _ in range(args.repeats):  # in turn, so that a busy moment of the machine hits both
        for name, llm in models.items():
            tokens, seconds = llama_greedy(llm, prompts[0], args.new_tokens)
            speed[name].append((len(tokens) - 1) / seconds)
    for name in models:
        result[name]["decode_tokens_per_second"] = statistics.median(speed[name])
    result["speedup"] = result["pruned"]["decode_tokens_per_second"] / result["unpruned"]["decode_tokens_per_second"]
    (out / "llamacpp.json").write_text(json.dumps(result, indent=1))
    print(f"greedy tokens equal to PyTorch's on {result['same_tokens']}/{len(prompts)} prompts "
          f"({args.new_tokens} new tokens each; first differences: {differences})")
    for name in models:
        r = result[name]
        print(f"{name}: KV cache {r['kv_cache_mib']} MiB (predicted {r['kv_cache_mib_predicted']:.3f} MiB for "
              f"{context} positions, f16), decoding {r['decode_tokens_per_second']:.1f} tokens/s")
    print(f"decoding speed, pruned / unpruned: {result['speedup']:.2f}x")


if __name__ == "__main__":
    main()
