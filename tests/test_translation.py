"""Translation: parallel data in every layout, BLEU as sacrebleu computes it, and a tiny
encoder-decoder trained from scratch, pruned and reloaded as a complete translation model."""
import json
import random
from collections import Counter

import pytest
import sacrebleu
import torch
from transformers import AutoTokenizer

from headprune import attach_gates, detach_gates, load_pruned
from headprune.config import FinetuneConfig, PruneConfig
from headprune.errors import ConfigError, DataError, ModelError
from headprune.parallel import ding_pairs, load_parallel, remove_bpe
from headprune.recipes import finetune, prune
from headprune.train import TokenBatches
from headprune.tasks.translation import bleu_scores, inverse_sqrt, learn_vocabulary

LEXICON = {"der": "the", "die": "the", "hund": "dog", "katze": "cat", "sieht": "sees", "mag": "likes",
           "haus": "house", "ein": "a", "großes": "big", "kleines": "small"}


def write_pairs(path, n=240, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(list(LEXICON)) for _ in range(rng.randint(3, 6))]
        rows.append({"de": " ".join(words), "en": " ".join(LEXICON[w] for w in words)})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


# -- data ------------------------------------------------------------------------------------------

def test_remove_bpe_on_a_hand_made_line():
    assert remove_bpe("wir ge@@ hen nach hau@@ se .") == "wir gehen nach hause ."
    assert remove_bpe("end@@") == "end" and remove_bpe("e-@@ mail@@ s") == "e-mails"


def test_the_fairseq_layout_with_bpe_markers(tmp_path):
    for split, de, en in [("train", "das ist ein te@@ st .\nhal@@ lo welt .", "this is a te@@ st .\nhel@@ lo world ."),
                          ("valid", "gu@@ ten tag .", "good day ."), ("test", "ja .", "yes .")]:
        (tmp_path / f"{split}.de").write_text(de + "\n")
        (tmp_path / f"{split}.en").write_text(en + "\n")
    data = load_parallel(str(tmp_path))
    assert list(data.evals) == ["valid", "test"]
    assert data.train["source"] == ["das ist ein test .", "hallo welt ."] and data.train["target"][1] == "hello world ."
    assert data.tokenized and data.evals["valid"]["source"] == ["guten tag ."]


def test_plain_parallel_files_must_be_aligned_and_complete(tmp_path, caplog):
    (tmp_path / "train.de").write_text("Hallo.\nJa.\n")
    (tmp_path / "train.en").write_text("Hello.\n")
    (tmp_path / "test.de").write_text("Nein.\n")
    (tmp_path / "test.en").write_text("No.\n")
    with pytest.raises(DataError, match="train.de has 2 lines but .*train.en has 1: they must be line-aligned"):
        load_parallel(str(tmp_path))
    (tmp_path / "train.en").write_text("Hello.\n\n")
    with pytest.raises(DataError, match=r"train.en, line 2: empty line .*--drop-incomplete-rows"):
        load_parallel(str(tmp_path))
    data = load_parallel(str(tmp_path), drop_incomplete=True)
    assert len(data.train) == 1 and data.dropped_rows == {str(tmp_path / "train.de"): 1}
    assert "train.de: dropped 1 of 2 sentence pairs with an empty or missing side" in caplog.text
    assert not data.tokenized


def test_jsonl_with_two_columns(tmp_path):
    path = write_pairs(tmp_path / "p.jsonl", n=20)
    data = load_parallel(str(path))
    assert len(data.train) == 18 and list(data.evals) == ["heldout"]
    with pytest.raises(DataError, match=r"no column\(s\) \['src'\]"):
        load_parallel(str(path), text_columns=["src", "en"])
    (tmp_path / "bad.jsonl").write_text('{"de": "a", "en": "b"}\n{"de": "", "en": "c"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: the text cell of column 'de'"):
        load_parallel(str(tmp_path / "bad.jsonl"))


def test_ding_entries_become_aligned_sentence_pairs(tmp_path):
    (tmp_path / "de-en").write_text(
        "# Version :: test\n"
        "Ich gehe heute nach Hause. {v} | Wir gehen morgen nicht mehr hin. :: I am going home today. | "
        "We are not going there tomorrow anymore.\n"
        "Das ist zu kurz. :: That is too short.\n"
        "die eigentliche Ursache für etw. :: the actual underlying cause of sth.\n"
        "Er hat es mir gestern gesagt. [ugs.]; Er sagte es mir gestern. :: He told me about it yesterday.\n"
        "Ich gehe heute nach Hause. :: I am going home today.\n")
    assert ding_pairs(tmp_path / "de-en") == [
        ("Ich gehe heute nach Hause.", "I am going home today."),
        ("Wir gehen morgen nicht mehr hin.", "We are not going there tomorrow anymore."),
        ("Er hat es mir gestern gesagt.", "He told me about it yesterday.")]
    with pytest.raises(DataError, match="apt-get install trans-de-en"):
        ding_pairs(tmp_path / "missing")


# -- metric ------------------------------------------------------------------------------------------

def test_bleu_equals_sacrebleu_on_hand_made_strings():
    hyps = ["the cat sat on the mat .", "a dog barks loudly ."]
    refs = ["the cat sat on a mat .", "the dog barks loudly ."]
    scores = bleu_scores("test", hyps, refs, tokenized=False)
    assert scores["test"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["test chrF"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert "test tokenized BLEU" not in scores and list(scores)[0] == "test"  # the headline first
    # BLEU by hand: precisions 10/12, 7/10, 4/8, 2/6 (no brevity penalty: equal lengths)
    assert scores["test"] == pytest.approx(100 * (10 / 12 * 7 / 10 * 4 / 8 * 2 / 6) ** 0.25, abs=1e-9)
    line = "it &apos;s a fine day , isn &apos;t it ?"
    tokenized = bleu_scores("test", [line], [line], tokenized=True)
    assert tokenized["test tokenized BLEU"] == pytest.approx(100.0) and tokenized["test"] == pytest.approx(100.0)


def test_inverse_square_root_schedule():
    f = inverse_sqrt(4)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(15) == pytest.approx(0.5)  # step 16: sqrt(4 / 16)


def test_a_learned_vocabulary_decodes_back_to_the_text():
    tok = learn_vocabulary(["der hund sieht ein haus", "the dog sees a house"] * 20, vocab_size=60)
    ids = tok("the dog sees a house")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == "the dog sees a house"


# -- end to end ------------------------------------------------------------------------------------------

def tiny_cfg(cls, data, out, **kw):
    base = dict(task="translation", model="scratch:transformer-tiny", dataset=str(data), vocab_size=64,
                batch_size=16, lr=3e-3, warmup_steps=50, dropout=0.1, beam=2, output_dir=str(out),
                checkpoint_every=0)
    return cls(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("translation")
    data = write_pairs(folder / "pairs.jsonl", n=300)
    results = finetune(tiny_cfg(FinetuneConfig, data, folder / "ft", epochs=40))
    return folder / "ft" / "model", data, results


def test_training_from_scratch_learns_and_saves_a_complete_model(trained):
    model_dir, _, results = trained
    assert results["task"] == "translation" and results["metric"] == "bleu"
    assert list(results["metrics"]) == ["heldout", "heldout chrF"]
    assert results["metrics"]["heldout"] > 10  # a lexicon task: random output scores about 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # the learned vocabulary travels with it
    model = load_pruned(model_dir)
    assert type(model).__name__ == "MarianMTModel"
    # the words of the reference found in the output, over sentences like the training ones: a tiny
    # model trained for seconds gets some words wrong, and which ones differs between CPUs
    # (measured: 15 of 19), while output that ignores its input finds a few "the"s and "a"s
    sources = ["der hund sieht ein haus", "die katze mag ein kleines haus", "ein großes haus", "der hund mag die katze"]
    found = 0
    for source in sources:
        out = model.generate(**tokenizer([source], return_tensors="pt"), num_beams=2, max_new_tokens=10)
        words = Counter(tokenizer.decode(out[0], skip_special_tokens=True).split())
        found += sum((words & Counter(LEXICON[w] for w in source.split())).values())
    assert found >= 11  # of 19


def test_pipelined_pruning_of_a_translation_model_reloads_with_the_masked_outputs(trained, tmp_path):
    model_dir, data, _ = trained
    results = prune(tiny_cfg(PruneConfig, data, tmp_path, model=str(model_dir), k=10, epochs=2, t0=1.0, tf=1e-3))
    assert results["k"] == 10 and results["num_heads"] == 24 and set(results["metrics_pruned"]) == {"heldout", "heldout chrF"}
    kinds = {h[0] for h in results["kept_heads"]}
    assert kinds <= {"encoder", "decoder", "cross"}
    pruned, original = same_generations_as_the_mask(model_dir, tmp_path / "model", results["kept_heads"])
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in original.parameters())


def same_generations_as_the_mask(original_dir, pruned_dir, kept):
    """The saved pruned model's beam search equals the original's with the other heads masked:
    (pruned, original)."""
    tokenizer = AutoTokenizer.from_pretrained(pruned_dir)
    pruned, original = load_pruned(pruned_dir), load_pruned(original_dir)
    gates = attach_gates(original)
    gates.set_mask(torch.tensor([float(tuple(h) in map(tuple, kept)) for h in gates.heads]))
    source = tokenizer(["der hund sieht ein großes haus", "die katze"], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = original.generate(**source, num_beams=2, max_new_tokens=8)
        detach_gates(original)
        assert torch.equal(pruned.generate(**source, num_beams=2, max_new_tokens=8), expected)
    return pruned, original


def test_joint_pruning_from_scratch_and_errors(trained, tmp_path):
    _, data, _ = trained
    results = prune(tiny_cfg(PruneConfig, data, tmp_path / "joint", mode="joint", k=8, epochs=2, t0=1.0, tf=1e-3))
    assert results["mode"] == "joint" and len(results["kept_heads"]) == 8
    with pytest.raises(ModelError, match="unknown model 'scratch:huge'; from scratch: scratch:transformer-iwslt-de-en"):
        prune(tiny_cfg(PruneConfig, data, tmp_path / "x", model="scratch:huge", mode="joint", k=8))
    with pytest.raises(ModelError, match="^'scratch:transformer-tiny' is a new, untrained model: pipelined pruning "
                                         "starts from a trained one"):  # (scores learned on random weights)
        prune(tiny_cfg(PruneConfig, data, tmp_path / "y", k=8))
    assert not (tmp_path / "y").exists()


# -- budgets per kind ------------------------------------------------------------------------------------

def test_selectors_keep_exactly_k_per_group():
    from headprune.methods import DSPSelector, HardConcreteSelector, random_mask
    budget = [([0, 1, 2, 3], 1), ([4, 5, 6, 7], 3), ([8, 9, 10, 11], 0)]
    for selector in (DSPSelector(12, None, t0=1.0, budget=budget, seed=1),
                     DSPSelector(12, None, straight_through=True, budget=budget, seed=1),
                     HardConcreteSelector(12, None, budget=budget, seed=1)):
        selector.eval()
        mask = selector()
        assert [int(mask[i].sum()) for i, _ in budget] == [1, 3, 0]
    dsp = DSPSelector(12, None, t0=1.0, budget=budget, seed=1).train()
    soft = dsp()
    assert [round(float(soft[i].sum().detach()), 6) for i, _ in budget] == [1.0, 3.0, 0.0]  # soft top-k per group
    soft.sum().backward()
    assert dsp.logits.grad is not None
    mask = random_mask(12, 0, seed=3, budget=budget)
    assert [int(mask[i].sum()) for i, _ in budget] == [1, 3, 0]


def test_michel_with_budgets_never_takes_a_group_below_its_budget():
    from headprune.methods import iterative_pruning
    importance = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.0, 0.05, 0.7, 0.6])  # group 0 holds the weakest
    curve = iterative_pruning(8, 3, 0, lambda m: importance, lambda m: {"x": float(m.sum())},
                              budget=[([0, 1, 2, 3], 3), ([4, 5, 6, 7], 1)])
    assert [e["pruned_now"] for e in curve[1:]] == [[4, 5, 2], [7]]
    assert curve[-1]["mask"].tolist() == [1, 1, 0, 1, 0, 0, 1, 0]


def test_a_translation_run_with_a_budget_per_kind(trained, tmp_path, capsys):
    model_dir, data, _ = trained
    for method in ("dsp", "michel", "flap"):  # flap: the decoder and cross sites read the target positions
        results = prune(tiny_cfg(PruneConfig, data, tmp_path / method, model=str(model_dir), method=method,
                                 k_per_kind=[2, 3, 5], michel_step=4, epochs=1, t0=1.0, tf=1e-3,
                                 reconstruct="both" if method == "flap" else "none"))
        assert results["kept_per_kind"] == {"encoder": 2, "decoder": 3, "cross": 5}
        assert saved_models_metrics(tmp_path / method) == results["metrics_pruned"]
    # reconstruction fits the blocks in the order the model runs them: the encoder, then each
    # decoder layer's self-attention before its cross-attention
    order = [(e["kind"], e["layer"]) for e in results["reconstruction_error"]]
    assert order == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("cross", 0), ("decoder", 1), ("cross", 1)]
    assert all(e["after"] <= e["before"] for e in results["reconstruction_error"])
    from headprune.cli import main
    assert main(["prune", "--task", "translation", "--model", str(model_dir), "--dataset", str(data),
                 "--k-per-kind", "2", "3", "--output-dir", str(tmp_path / "x")]) == 2
    assert "--k-per-kind needs 3 number(s) for this model, one per kind (encoder: 8 heads, decoder: 8 heads, cross: 8 heads)" \
        in capsys.readouterr().err


def test_a_kind_a_model_pruned_before_has_emptied_is_counted_as_zero(trained, tmp_path):
    model_dir, data, _ = trained
    first = prune(tiny_cfg(PruneConfig, data, tmp_path / "once", model=str(model_dir), method="random",
                           k_per_kind=[0, 3, 3]))
    assert first["kept_per_kind"] == {"encoder": 0, "decoder": 3, "cross": 3}
    for method in ("random", "dsp", "michel", "fisher"):  # the budget's kinds in the original's order
        again = prune(tiny_cfg(PruneConfig, data, tmp_path / method, model=str(tmp_path / "once" / "model"),
                               method=method, k_per_kind=[0, 2, 2], epochs=1, t0=1.0, tf=1e-3))
        assert again["kept_per_kind"] == {"encoder": 0, "decoder": 2, "cross": 2}, method


def saved_models_metrics(run):
    """What the task's evaluation gives the model a run saved, on the run's own data and settings."""
    from accelerate import Accelerator

    from headprune.tasks import get_task
    config = json.loads((run / "results.json").read_text())["config"]
    cfg = PruneConfig(**{**config, "k": None if config["k_per_kind"] else config["k"], "output_dir": str(run / "x")})
    task = get_task("translation")
    data = task.load_data(cfg)
    model, tokenizer = task.load_model(cfg, data, str(run / "model"), load_pruned(run / "model").config, True)
    _, evals, collate = task.prepare(data, tokenizer, cfg)
    return task.evaluate(Accelerator(), model, evals, collate, cfg)


def test_a_kv_cache_target_on_an_encoder_decoder_prunes_its_decoder_self_attention(trained, tmp_path):
    from headprune.measuring import kv_cache_bytes_per_token
    from headprune.pruning import load_pruned
    model_dir, data, _ = trained
    whole = kv_cache_bytes_per_token(load_pruned(model_dir))
    for method, allocation in (("fisher", "global"), ("dsp", "uniform")):
        results = prune(tiny_cfg(PruneConfig, data, tmp_path / method, model=str(model_dir), method=method, k=None,
                                 target_kv_cache=0.5, allocation=allocation, epochs=1, t0=1.0, tf=1e-3))
        # only the decoder's self-attention caches per generated token: 4 of its 8 heads; the rest stay
        assert results["kept_per_kind"] == {"encoder": 8, "decoder": 4, "cross": 8}
        assert results["allocation"] == results["budget"]["allocation"] == allocation
        assert results["budget"]["measured"] == results["budget"]["predicted"] == whole / 2
        assert kv_cache_bytes_per_token(load_pruned(tmp_path / method / "model")) == whole / 2
    per_layer = [layer for kind, layer, _ in results["kept_heads"] if kind == "decoder"]
    assert sorted(per_layer) == [0, 0, 1, 1]  # uniform: as many in each decoder layer


def test_the_latency_table_checks_its_sum_with_every_kind_pruned_at_once(trained, tmp_path, monkeypatch):
    import headprune.latency as latency
    import headprune.measuring as measure
    from headprune.pruning import load_pruned
    from headprune.sites import find_sites
    monkeypatch.setenv("HEADPRUNE_CACHE", str(tmp_path))

    def fake_alternate(models, run, repeats, warmup, device):  # no clock: 10 ms + kept^2 / 24 ms (not additive)
        return {name: {"median": 0.010 + sum(s.num_heads for s in find_sites(m)) ** 2 / 24 / 1000}
                for name, m in models.items()}
    monkeypatch.setattr(measure, "alternate", fake_alternate)
    model = load_pruned(trained[0])  # 3 kinds x 2 layers x 4 heads
    table = latency.latency_table(model, "group", 2, 8, "cpu")
    # each kind at h (the others whole): 10 + (16 + 2h)^2 / 24 ms, so one layer's 2 heads more cost
    # (24^2 - 20^2) / 24 / 2 = 3.67 ms: half the heads (2 a layer) should save 6 x 3.67 = 22 ms; the
    # check times them: 34 - (10 + 12^2 / 24) = 18 ms, and scales every cost by 18 / 22
    assert table["check"]["saved_predicted"] == pytest.approx(0.022)
    assert table["check"]["saved_measured"] == pytest.approx(0.018) and table["check"]["scale"] == pytest.approx(18 / 22)
    half = latency.even_mask(find_sites(model), 12)
    assert latency.predicted_seconds(table, find_sites(model), half) == pytest.approx(0.016)


def test_token_batches_cover_every_example_once_within_the_budget():
    from headprune.train import TokenBatches
    lengths = [random.Random(i).randint(2, 30) for i in range(200)]
    epochs = [list(TokenBatches(lengths, 64, seed=0, epoch=e)) for e in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64 for b in batches)
    assert len({len(b) for b in epochs}) == 1  # the same number of batches every epoch
    assert epochs[0] != epochs[1] and list(TokenBatches(lengths, 64, seed=0, epoch=0)) == epochs[0]


def test_training_with_max_tokens(trained, tmp_path):
    from headprune.errors import ConfigError
    _, data, _ = trained
    results = finetune(tiny_cfg(FinetuneConfig, data, tmp_path, epochs=1, max_tokens=100))
    assert 270 / 100 < results["steps"] < 270  # more sentences a batch than one, fewer than all
    with pytest.raises(ConfigError, match="--max-tokens batches translation data"):
        FinetuneConfig(max_tokens=100)


def test_the_best_epoch_by_validation_bleu_is_kept(trained, tmp_path):
    from headprune.errors import ConfigError
    _, data, _ = trained
    results = prune(tiny_cfg(PruneConfig, data, tmp_path / "best", mode="joint", k=12, epochs=3, t0=1.0, tf=1e-3,
                             select_by="heldout"))
    best = results["selected_epoch"]
    assert best["epoch"] in (1, 2, 3)
    # the kept weights and heads are those of that epoch: the final evaluation repeats its score
    assert results["metrics_pruned"]["heldout"] == pytest.approx(best["score"])
    assert not (tmp_path / "best" / "best").exists()  # removed with the checkpoint at the end
    with pytest.raises(ConfigError, match="--select-by 'dev': the evaluation splits are heldout"):
        prune(tiny_cfg(PruneConfig, data, tmp_path / "x", mode="joint", k=12, select_by="dev"))


@pytest.mark.parametrize("size", [1, 2, 33])
def test_every_sentence_of_an_evaluation_split_is_translated_once(trained, tmp_path, size, monkeypatch):
    """An evaluation split (or last generation batch) of one sentence, or 33 with batches of 32:
    accelerate cuts the last gathered batch to the sentences left, which must not cut a tuple."""
    import headprune.tasks.translation as translation
    model_dir, data, _ = trained
    rows = [json.loads(line) for line in data.read_text().splitlines()][:size]
    (tmp_path / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seen = {}
    real = translation.bleu_scores
    monkeypatch.setattr(translation, "bleu_scores", lambda split, hyps, refs, *a: seen.update({split: (hyps, refs)})
                        or real(split, hyps, refs, *a))
    results = prune(tiny_cfg(PruneConfig, data, tmp_path / "out", model=str(model_dir), method="random", k=12,
                             eval_files=[str(tmp_path / "valid.jsonl")], generation_batch_size=32))
    hypotheses, references = seen["valid"]
    assert references == [r["en"] for r in rows] and len(hypotheses) == size
    assert results["eval_examples"] == {"valid": size}


@pytest.mark.parametrize("family", ["t5", "longt5"])
def test_a_t5_translation_model_prunes_three_kinds_of_heads_and_reloads(tmp_path, family):
    from transformers import LongT5Config, LongT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration
    data = write_pairs(tmp_path / "pairs.jsonl", n=120)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    tokenizer = learn_vocabulary([r["de"] for r in rows] + [r["en"] for r in rows], vocab_size=64)
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=8, dropout_rate=0.0, initializer_factor=3.0,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  decoder_start_token_id=tokenizer.pad_token_id)
    if family == "t5":
        model = T5ForConditionalGeneration(T5Config(**common))
    else:  # its encoder attends in blocks of 3 and to the means of every 2 tokens
        model = LongT5ForConditionalGeneration(LongT5Config(**common, local_radius=2, global_block_size=2,
                                                            encoder_attention_type="transient-global"))
    model.generation_config.no_repeat_ngram_size, model.generation_config.bad_words_ids = 2, [[5]]
    model.save_pretrained(tmp_path / "t5")  # with its generation_config.json, as pretrained models ship
    tokenizer.save_pretrained(tmp_path / "t5")
    results = prune(tiny_cfg(PruneConfig, data, tmp_path / "out", model=str(tmp_path / "t5"), k_per_kind=[3, 2, 2],
                             epochs=1, t0=1.0, tf=1e-3))
    assert results["kept_per_kind"] == {"encoder": 3, "decoder": 2, "cross": 2} and results["num_heads"] == 24
    reloaded = load_pruned(tmp_path / "out" / "model").generation_config  # the settings its BLEU was made with
    assert (reloaded.no_repeat_ngram_size, reloaded.bad_words_ids) == (2, [[5]])
    same_generations_as_the_mask(tmp_path / "t5", tmp_path / "out" / "model", results["kept_heads"])
    if family == "longt5":  # transformers runs it with eager attention only: said before anything starts
        with pytest.raises(ConfigError, match="^LongT5ForConditionalGeneration has no sdpa attention in "
                                              "transformers: use --attn-implementation eager$"):
            prune(tiny_cfg(PruneConfig, data, tmp_path / "sdpa", model=str(tmp_path / "t5"), k=4,
                           attn_implementation="sdpa"))
        assert not (tmp_path / "sdpa").exists()


def test_a_token_batch_may_hold_exactly_max_tokens():
    """--max-tokens is a bound that a batch may reach (sentences x the longest of them <= max_tokens,
    as fairseq counts): four sentences of 3 tokens with 6 a batch make two batches of two."""
    batches = TokenBatches([3, 3, 3, 3], max_tokens=6, seed=0, epoch=0)
    assert len(batches) == 2
    assert sorted(len(b) for b in batches) == [2, 2]
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3]
