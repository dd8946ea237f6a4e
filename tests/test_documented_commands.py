"""Every `headprune` command in README.md and docs/usage.md, and the README's Python snippet, run
as written, in document order, in a fresh folder. Behind the offline names stand a tiny random
model of MiniLM-L6's head layout (6 layers x 12 heads), a tiny translation model and tiny
learnable data sets, so the commands run in seconds; everything else (paths, budgets, configs,
flags) is the documents' own."""
import re
import shlex
from pathlib import Path

import pytest
from transformers import AutoModelForSequenceClassification, BertConfig

import headprune.tasks.base as task_base
import headprune.tasks.classification as classification_task
from headprune.cli import main
from headprune.data import ClassificationData

ROOT = Path(__file__).parent.parent


def documented_commands(doc: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S):
        text = block.replace("\\\n", " ")  # continued lines
        commands += [line.split("  #")[0].strip() for line in text.splitlines() if line.startswith("headprune ")]
    return commands


@pytest.fixture
def offline_names_are_tiny(tmp_path_factory, tiny_assets, monkeypatch):
    from conftest import write_tiny_assets
    assets = write_tiny_assets(tmp_path_factory.mktemp("docs-assets"), n_rows=64)
    model_dir = assets[0]
    config = BertConfig(vocab_size=99, hidden_size=24, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=16, max_position_embeddings=128)
    AutoModelForSequenceClassification.from_config(config).base_model.save_pretrained(model_dir)
    real_resolve, real_load = task_base.resolve_model, classification_task.load_classification
    monkeypatch.setattr(task_base, "resolve_model",
                        lambda name: str(model_dir) if name == "offline:minilm-l6" else real_resolve(name))

    def load(name, **kw):
        if name == "offline:rotten-tomatoes":
            data = real_load(str(assets[1]), **{**kw, "label_column": "label", "text_columns": None})
            return ClassificationData(data.train, {"validation": data.evals["heldout"]}, data.text_columns,
                                      data.label_names)
        return real_load(name, **kw)
    monkeypatch.setattr(classification_task, "load_classification", load)

    # translation: the Ding pairs and the small model from scratch stand in as tiny ones
    import headprune.tasks.translation as translation_task
    from test_translation import write_pairs
    pairs = write_pairs(assets[1].parent / "pairs.jsonl", n=64)
    real_parallel = translation_task.load_parallel
    monkeypatch.setattr(translation_task, "load_parallel", lambda name, **kw: real_parallel(
        str(pairs) if name == "offline:ding-de-en" else name, **{**kw, "text_columns": None}))
    monkeypatch.setitem(translation_task.SCRATCH, "transformer-small", translation_task.SCRATCH["transformer-tiny"])

    # language models: SmolLM2's 90 KV groups (here 15 layers x 6 groups of 2 query heads: half its
    # layers, so that the generation timings take half as long), tiny, on tiny text
    import headprune.tasks.language_modeling as lm_task
    from conftest import write_tiny_lm
    lm_model, lm_text = write_tiny_lm(assets[1].parent / "lm", layers=15, heads=12, kv_heads=6, n_train=200)
    monkeypatch.setattr(task_base, "resolve_model", lambda name, inner=task_base.resolve_model: (
        str(lm_model) if name == "offline:smollm2-135m" else inner(name)))
    # export --format gguf copies the tokenizer from the unpruned model's GGUF: a tiny one here
    from conftest import write_tokenizer_gguf
    lm_gguf = write_tokenizer_gguf(assets[1].parent / "lm" / "tokenizer.gguf", vocab=44)
    monkeypatch.setattr(task_base, "smollm2_gguf", lambda: str(lm_gguf))
    real_text = lm_task.load_text
    monkeypatch.setattr(lm_task, "load_text", lambda name, *a: real_text(
        str(lm_text) if name == "offline:rotten-tomatoes" else name, *a))

    # timings on a clock that counts heads (10 ms plus 1 ms a head), so that a speed target or a
    # measurement on these tiny models does not depend on how busy the machine is; the real clock
    # is tested in test_budget.py and test_measure.py (ONNX Runtime sessions keep it)
    import torch

    import headprune.measuring as measure
    from headprune.sites import find_sites
    real_alternate = measure.alternate

    def head_clock(models, run, repeats, warmup, device):
        if not all(isinstance(m, torch.nn.Module) for m in models.values()):
            return real_alternate(models, run, repeats, warmup, device)
        return {name: measure.spread([0.010 + 0.001 * sum(s.num_heads for s in find_sites(m))] * repeats)
                for name, m in models.items()}
    monkeypatch.setattr(measure, "alternate", head_clock)

    # the figures of a run (a second each, a hundred runs here) are tested in test_recipes.py
    import headprune.recipes as recipes
    import headprune.report as report
    monkeypatch.setattr(report, "plot_training_curves", lambda path, *a, **k: path.write_bytes(b"\x89PNG"))
    monkeypatch.setattr(recipes, "plot_head_map", lambda path, *a, **k: path.write_bytes(b"\x89PNG"))


def test_readme_and_usage_commands_run_as_written(offline_names_are_tiny, tmp_path, monkeypatch, capsys):
    import shutil
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = documented_commands(ROOT / "README.md") + documented_commands(ROOT / "docs" / "usage.md")
    assert len(commands) >= 10
    for command in commands:
        argv = shlex.split(command)[1:]
        if "--help" in argv:
            with pytest.raises(SystemExit) as stop:
                main(argv)
            assert stop.value.code == 0, command
        else:
            assert main(argv) == 0, f"{command}\n{capsys.readouterr().err[-3000:]}"
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("From Python:")[1].split("```python\n")[1].split("```")[0]
    exec(snippet, {})
    assert (tmp_path / "runs" / "sweep3" / "report.md").exists() and (tmp_path / "runs" / "dsp24" / "speed" / "measure.md").exists()
