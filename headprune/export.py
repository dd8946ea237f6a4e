"""`headprune export`: a saved model where users serve it (GGUF for llama.cpp: `llamacpp.py`).

ONNX (`--format onnx`): the model as headprune loads it (uneven heads per layer, layers without
heads that skip attention) traced by torch's exporter (`torch.onnx.export(dynamo=True)`) with
dynamic batch and sequence axes, then run in ONNX Runtime on two input shapes and compared with
PyTorch: a graph whose outputs differ by more than `TOLERANCE` is not written. Encoder
classifiers of text (token ids and attention mask in, dynamic batch and length) and of images
(pixels in, dynamic batch; the size is the model's) for now; other models get an error that says so.
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError, OutputExistsError, require
from .outputs import atomic_files, check_writable, nearest_existing
from .pruning import load_pruned, load_pruned_config
from .sites import find_sites

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference allowed between ONNX Runtime's outputs and PyTorch's


def sample_inputs(config, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask with the last sequence padded, as a tokenizer gives them;
    for a model with segments (BERT's `token_type_ids`), two texts: the second half is the second."""
    g = torch.Generator().manual_seed(seed)
    low = min(10, config.vocab_size - 1)
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, length // 2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if (getattr(config, "type_vocab_size", None) or 0) > 1:  # (padding is segment 0, as tokenizers give it)
        inputs["token_type_ids"] = (torch.arange(length) >= length // 2).long().expand(batch, length) * mask
    return inputs


def sample_pixels(config, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random images of the model's size and channels, as its image processor gives them."""
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, getattr(config, "num_channels", 3), *size, generator=g)}


def classifier_kind(config) -> str | None:
    """"text" for a sequence classifier, "image" for an image classifier, None for anything else."""
    names = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        return None
    if any(n.endswith("ForSequenceClassification") for n in names):
        return "text"
    if any(n.endswith("ForImageClassification") for n in names):
        return "image"
    return None


def example_inputs(model, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """The inputs of a classifier of either kind (`length`: tokens; an image's size is the model's),
    those its forward takes: the graph's inputs."""
    if classifier_kind(model.config) == "image":
        return sample_pixels(model.config, batch, seed)
    takes = inspect.signature(model.forward).parameters
    return {name: t for name, t in sample_inputs(model.config, batch, length, seed).items() if name in takes}


def check_output(cfg) -> None:
    """Refuse, before any work, an --output that lies inside the model folder (it would replace or add to
    the model's own files), is the GGUF read for its tokenizer, is a folder, exists (unless
    --overwrite) or cannot be written."""
    output = Path(cfg.output)
    model = Path(cfg.model).expanduser()
    if model.is_dir() and model.resolve() in output.resolve().parents:
        raise OutputExistsError(f"{output} lies inside the model folder {cfg.model}: an export never writes inside "
                                "its input; choose an --output apart from it")
    tokenizer = getattr(cfg, "tokenizer_gguf", None)  # (gguf) the unpruned GGUF read for its tokenizer
    if tokenizer and output.resolve() == Path(tokenizer).expanduser().resolve():
        raise OutputExistsError(f"{output} is the --tokenizer-gguf this export reads: an export never writes over "
                                "its input; choose another --output")
    if output.is_dir() or str(cfg.output).endswith(("/", os.sep)):  # ("out/": a folder meant, not a file "out")
        raise OutputExistsError(f"{cfg.output} is a folder: --output names the file to write")
    if output.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{output} exists: give --overwrite to replace it, or another --output")
    # the nearest folder that exists takes the new file (and any folders above it): probed now
    check_writable(nearest_existing(output.parent))


def export_onnx(cfg) -> dict:
    """Write cfg.model as ONNX to cfg.output after checking it in ONNX Runtime; what was checked."""
    require("onnx", "onnxruntime", "onnxscript", extra="onnx")
    output = Path(cfg.output)
    check_output(cfg)
    config = load_pruned_config(cfg.model)
    if classifier_kind(config) is None:
        raise ModelError(_not_yet(cfg.model, config))
    model = load_pruned(cfg.model)
    check_exportable(model, cfg.model)
    log.info("exporting %s to ONNX", cfg.model)
    worst = write_onnx(model, output, cfg.opset)
    log.info("wrote %s (ONNX Runtime against PyTorch: largest difference %.2g)", output, worst)
    return {"output": str(output), "format": "onnx", "max_abs_difference": worst,
            "inputs": list(example_inputs(model, 1, 1, seed=0)), "outputs": ["logits"]}


def _not_yet(name, config, why: str = "") -> str:
    names = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    return (f"{name} is a {names} model{why}: the ONNX export takes classifiers built on an encoder (BERT-like "
            "...ForSequenceClassification, ...ForImageClassification) so far")


def check_exportable(model, name) -> None:
    """Refuse in one line a model the ONNX export cannot write: a classifier on decoder layers (GPT-2's,
    Llama's: the exporter fails on their cache) or a model without attention heads (FNet)."""
    if classifier_kind(model.config) is None or any(site.kind != "encoder" for site in find_sites(model)):
        raise ModelError(_not_yet(name, model.config, ", whose layers are decoder layers"
                                  if classifier_kind(model.config) else ""))


def write_onnx(model, output: Path, opset: int | None = None) -> float:
    """Trace `model` (a classifier of text or images) with a dynamic batch axis (and sequence axis,
    for text), run the graph in ONNX Runtime on two other shapes and write it to `output` (with its
    weights beside it, `<output>.data`, where the graph would pass 2 GB) only if its logits are
    within TOLERANCE of PyTorch's and its opset is the one asked for; returns the largest difference."""
    import onnx
    import onnxruntime

    model = model.float().eval()
    example = example_inputs(model, 2, 8, seed=0)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch} if classifier_kind(model.config) == "image" else {0: batch, 1: length}
    with torch.no_grad():
        program = torch.onnx.export(model, (), kwargs=example, dynamo=True, opset_version=opset,
                                    dynamic_shapes={name: axes for name in example},
                                    input_names=list(example), output_names=["logits"], verbose=False)
    with atomic_files(output, companions=(f"{output.name}.data",)) as folder:  # nothing is left if a check fails
        graph = folder / output.name
        program.save(str(graph))
        written = next(o.version for o in onnx.load(str(graph), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx"))
        if opset is not None and written != opset:  # torch's exporter falls back to its own when it cannot convert
            raise ModelError(f"--opset {opset}: torch's exporter could not convert this model to it (it wrote opset "
                             f"{written}): not written; give --opset {written}, or leave it out")
        session = onnxruntime.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        worst = 0.0
        for shape, seed in (((3, 13), 1), ((1, 5), 2)):  # other shapes than the traced one
            inputs = example_inputs(model, *shape, seed=seed)
            with torch.no_grad():
                expected = model(**inputs).logits.numpy()
            got = session.run(["logits"], {name: t.numpy() for name, t in inputs.items()})[0]
            worst = float(np.max([worst, np.abs(got - expected).max()]))  # (NaN stays NaN: max(0, nan) is 0)
        del session  # (its file handles, before the files move)
        if not worst <= TOLERANCE:
            raise ModelError(f"the ONNX graph differs from PyTorch by {worst:.2g} (more than {TOLERANCE:g}): "
                             "not written")
    return worst


def onnx_sessions(models: dict, folder: Path, threads: int | None = None) -> dict:
    """An ONNX Runtime session (CPU) for each of `models` (name -> classifier), exported into `folder`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    sessions = {}
    for name, model in models.items():
        write_onnx(model, Path(folder) / f"{name}.onnx")
        sessions[name] = onnxruntime.InferenceSession(str(Path(folder) / f"{name}.onnx"), options,
                                                      providers=["CPUExecutionProvider"])
    return sessions
