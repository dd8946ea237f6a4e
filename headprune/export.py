"""`headprune export`: a saved model where users serve it (GGUF for llama.cpp: `llamacpp.py`).

ONNX (`--format onnx`): the model as headprune loads it (uneven heads per layer, layers without
heads that skip attention) traced by torch's exporter (`torch.onnx.export(dynamo=True)`) with
dynamic batch and sequence axes, then run in ONNX Runtime on two input shapes and compared with
PyTorch: a graph whose outputs differ by more than `TOLERANCE` is not written. Encoder
classifiers of text (token ids and attention mask in, dynamic batch and length) and of images
(pixels in, dynamic batch; the size is the model's) for now; other models get an error that says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .errors import ModelError, OutputExistsError, require
from .outputs import atomic_path, check_writable, nearest_existing
from .pruning import load_pruned, load_pruned_config
from .sites import find_sites

log = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest difference allowed between ONNX Runtime's outputs and PyTorch's


def sample_inputs(config, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Token ids and an attention mask with the last sequence padded, as a tokenizer gives them."""
    g = torch.Generator().manual_seed(seed)
    low = min(10, config.vocab_size - 1)
    ids = torch.randint(low, config.vocab_size, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[-1, length // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


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


def example_inputs(config, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """The inputs of a classifier of either kind (`length`: tokens; an image's size is the model's)."""
    if classifier_kind(config) == "image":
        return sample_pixels(config, batch, seed)
    return sample_inputs(config, batch, length, seed)


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
    if output.is_dir():
        raise OutputExistsError(f"{output} is a folder: --output names the file to write")
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
        names = getattr(config, "architectures", None) or []
        raise ModelError(f"{cfg.model} is a {', '.join(names) or config.model_type} model: `headprune export "
                         "--format onnx` exports encoder classifiers (...ForSequenceClassification, "
                         "...ForImageClassification) so far")
    model = load_pruned(cfg.model)
    find_sites(model)  # a model without attention heads (FNet's Fourier mixing): refused in one line
    log.info("exporting %s to ONNX", cfg.model)
    worst = write_onnx(model, output, cfg.opset)
    log.info("wrote %s (ONNX Runtime against PyTorch: largest difference %.2g)", output, worst)
    return {"output": str(output), "format": "onnx", "max_abs_difference": worst,
            "inputs": list(example_inputs(config, 1, 1, seed=0)), "outputs": ["logits"]}


def write_onnx(model, output: Path, opset: int | None = None) -> float:
    """Trace `model` (a classifier of text or images) with a dynamic batch axis (and sequence axis,
    for text), run the graph in ONNX Runtime on two other shapes and write it to `output` only if its
    logits are within TOLERANCE of PyTorch's; returns the largest difference."""
    import onnxruntime

    model = model.float().eval()
    config = model.config
    example = example_inputs(config, 2, 8, seed=0)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence")
    axes = {0: batch} if classifier_kind(config) == "image" else {0: batch, 1: length}
    with torch.no_grad():
        program = torch.onnx.export(model, (), kwargs=example, dynamo=True, opset_version=opset,
                                    dynamic_shapes={name: axes for name in example},
                                    input_names=list(example), output_names=["logits"], verbose=False)
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        program.save(str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        for shape, seed in (((3, 13), 1), ((1, 5), 2)):  # other shapes than the traced one
            inputs = example_inputs(config, *shape, seed=seed)
            with torch.no_grad():
                expected = model(**inputs).logits.numpy()
            got = session.run(["logits"], {name: t.numpy() for name, t in inputs.items()})[0]
            worst = float(np.max([worst, np.abs(got - expected).max()]))  # (NaN stays NaN: max(0, nan) is 0)
        if not worst <= TOLERANCE:  # leave nothing behind: atomic_path drops the file
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
