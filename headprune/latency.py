"""A latency table for `--target-speedup` (issue 24), measured on this machine once and
cached, the way Kwon et al. (2022) budget BERT by time: measured time is not linear in heads.

For each kind of head (encoder, decoder, cross), copies of the model with every layer of that kind
pruned to h units (h = 0 .. all; the other kinds whole) are timed against the whole model, each
pair taking turns on the same random batch (`--at-batch-size` x `--at-length`: one forward pass,
as `headprune measure` times it; with `--at-new-tokens`, generating that many tokens greedily, where
a decoder's heads are paid once per token). One layer of the kind with h units then costs
A(h) = (T(h) - T(0)) / layers, and a model with h_l units in layer l is predicted to take
T_whole - sum over layers of (A(all) - A(h_l)). With several kinds that sum is checked once: a
model with half the units of every layer of every kind is timed too, and if it saves more or less
than the sum says (by over 1%), every A is scaled to match (`check` in the table).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import torch
import transformers

from .errors import ConfigError, first_line
from .measuring import time_forward_or_generation, timing_machine
from .outputs import cache_root, keep_json
from .progress import progress_bar
from .pruning import remove_heads
from .sites import find_sites

log = logging.getLogger("headprune")


def _key(model, unit: str, batch: int, length: int, device: str, new_tokens: int | None) -> str:
    """A table per architecture, shape (a model pruned before: its heads per layer, which its config
    does not say), attention kernel, setting and machine."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("headprune", "id2label", "label2id", "_name_or_path")}  # (a copy of the model: the same table)
    shape = [(s.kind, s.layer, s.query_heads, s.kv_heads) for s in find_sites(model, unit)]
    kernel = getattr(model.config, "_attn_implementation", None)
    what = [config, shape, kernel, unit, batch, length, device, new_tokens, timing_machine(device), torch.__version__,
            transformers.__version__, "monotone", 21]
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def latency_table(model, unit: str, batch: int, length: int, device: str, new_tokens: int | None = None,
                  repeats: int = 20, warmup: int = 2) -> dict:
    """{"whole": seconds, "kinds": {kind: {"units": n, "layers": [layer...], "per_layer": [A(0)..A(n)]}}}:
    of one forward pass, or with `new_tokens` of generating that many tokens greedily (the prompt:
    `length` tokens)."""
    path = cache_root() / "latency" / f"{_key(model, unit, batch, length, device, new_tokens)}.json"
    if path.is_file():
        try:
            table = json.loads(path.read_text())
            log.info("latency table measured before on this machine (%s)", path)
            return table
        except (OSError, ValueError) as err:  # a cache only saves time: measured again
            log.warning("the cached latency table %s is unreadable (%s): measuring it again", path, first_line(err))
    whole, was_training = model, model.training  # timed as it is; the pruned copies one at a time
    whole.eval()
    sites = find_sites(whole, unit)
    kinds = list(dict.fromkeys(s.kind for s in sites))
    units = {kind: {s.num_heads for s in sites if s.kind == kind} for kind in kinds}
    uneven = [kind for kind in kinds if len(units[kind]) != 1]
    if uneven:
        raise ConfigError(f"--target-speedup: this model's {uneven[0]} layers have different numbers of heads")

    def timed(pair):  # as `headprune measure` times them: taking turns on one random batch
        return time_forward_or_generation(pair, batch, length, new_tokens, repeats, warmup, device, whole.config)

    def time_setting(setting: str) -> list[float]:  # "kind h": every layer of that kind with h units
        kind, h = setting.rsplit(" ", 1)
        kept = [(s.kind, s.layer, u) for s in sites for u in range(int(h) if s.kind == kind else s.num_heads)]
        timing = timed({"whole": whole, "pruned": pruned_copy(whole, kept, unit)})
        # the whole model's seconds, and the pruned one's as a share of the whole
        return [timing["whole"]["median"], timing["pruned"]["median"] / timing["whole"]["median"]]
    table = {"kinds": {}}
    whole_times = []
    # each setting's timing is kept as it is made: a run stopped midway times only the settings left
    partial = path.with_name(path.stem + ".partial.json")
    every = [f"{kind} {h}" for kind in kinds for h in range(next(iter(units[kind])))]  # h = all: the whole model
    done, writable = {k: v for k, v in _read_partial(partial).items() if k in every}, True
    log.info("measuring a latency table on %s: %d settings, each timed %d times against the whole model (once "
             "per machine: cached)%s", device, len(every), repeats,
             f"; {len(done)} timed before, by a run stopped while measuring it" if done else "")
    done = _still_alike(done, time_setting)
    bar = progress_bar(total=len(every), desc="latency table")
    for kind in kinds:
        n = next(iter(units[kind]))
        times = []
        for h in range(n):  # h = n is the whole model
            setting = f"{kind} {h}"
            if setting not in done:
                done[setting] = time_setting(setting)
                writable = writable and keep_json(partial, done, "a stopped table is measured again")  # (said once)
            whole_times.append(done[setting][0])
            times.append(done[setting][1])
            bar.update(1)
        times.append(1.0)
        table["kinds"][kind] = {"units": n, "layers": [s.layer for s in sites if s.kind == kind], "relative": times}
    seconds = sorted(whole_times)[len(whole_times) // 2]
    for entry in table["kinds"].values():  # seconds of one layer with h units, from T(0)
        layers = len(entry["layers"])
        relative = entry.pop("relative")
        # a layer with more units takes no less time: where noise says otherwise, the most of fewer units
        entry["per_layer"] = [max(relative[:h + 1]) - relative[0] for h in range(len(relative))]
        entry["per_layer"] = [a * seconds / layers for a in entry["per_layer"]]
    table["whole"] = seconds
    # The sum over layers assumes each layer's cost is its own, and the settings above vary one kind
    # at a time; one model with half the units of every layer of every kind checks the sum. (With
    # one kind that model is one of the settings again: timing it twice would only add noise.)
    if len(kinds) > 1:
        table["check"] = _check(table, whole, sites, unit, timed)
    bar.close()
    whole.train(was_training)
    log.info("latency table: the whole model takes %.4g ms; a layer with every unit %s", seconds * 1e3,
             ", ".join(f"{kind} {entry['per_layer'][-1] * 1e3:.3g} ms" for kind, entry in table["kinds"].items()))
    if keep_json(path, table, "the next run measures the table again"):
        partial.unlink(missing_ok=True)
    return table


def pruned_copy(whole, kept, unit: str):
    """`whole` with only the `kept` units, sharing every weight it keeps whole with `whole`: remove_heads
    puts new tensors in place of the ones it slices and changes none in place, so only the kept
    attention slices are new (a deep copy would be a second model on the device)."""
    shared = {id(t): t for t in (*whole.parameters(), *whole.buffers())}
    return remove_heads(copy.deepcopy(whole, shared), kept, unit)


def _read_partial(path) -> dict:
    """The settings a stopped run timed ({"kind h": [whole seconds, pruned share]}); {} where none
    or unreadable."""
    try:
        done = json.loads(path.read_text()) if path.is_file() else {}
        return {name: [float(v) for v in value] for name, value in done.items() if len(value) == 2}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}  # a damaged entry: its settings are timed again


RESUME_TOLERANCE = 0.1  # how far (a share of what it saves) a setting timed again may move on resume


def _still_alike(done: dict, time_setting) -> dict:
    """The settings a stopped run timed, if the machine still times alike: the one that saves most
    is timed again, and where it saves over RESUME_TOLERANCE more or less than it did (another load
    on the machine, another process's threads), the table starts again from that timing (mixing
    the two would skew every cost against the others)."""
    if not done:
        return done
    probe = max(done, key=lambda setting: 1 - done[setting][1])
    again = time_setting(probe)
    before, now = 1 - done[probe][1], 1 - again[1]
    if abs(now - before) <= RESUME_TOLERANCE * max(abs(before), abs(now)):
        return done
    log.warning("latency table: the machine times unlike the stopped run that began this table (%s: the pruned "
                "model saved %.1f%% then, %.1f%% now): timing every setting again", probe, 100 * before, 100 * now)
    return {probe: again}


def _check(table: dict, whole, sites, unit: str, timed) -> dict:
    """Time the model with half the units of every layer; scale every layer's costs so that the
    table predicts what it saves (left as it is within 1%)."""
    seconds = table["whole"]
    counts = even_counts(sites, sum(s.num_heads for s in sites) // 2)
    mask = even_mask(sites, sum(counts))
    kept = [(s.kind, s.layer, u) for s, c in zip(sites, counts) for u in range(c)]
    timing = timed({"whole": whole, "pruned": pruned_copy(whole, kept, unit)})
    measured = seconds * (1 - timing["pruned"]["median"] / timing["whole"]["median"])  # what half the units save
    predicted = seconds - predicted_seconds(table, sites, mask)
    scale = min(max(measured / predicted, 0.5), 1.5) if predicted > 0 else 1.0  # (a wild check is not trusted;
    scale = 1.0 if abs(scale - 1) < 0.01 else scale                              # within 1%, the sum holds)
    for entry in table["kinds"].values():
        entry["per_layer"] = [a * scale for a in entry["per_layer"]]
    log.info("latency table: half the units save %.4g s where the layers' sum says %.4g: costs scaled by %.3f",
             measured, predicted, scale)
    return {"units": int(mask.sum()), "saved_predicted": predicted, "saved_measured": measured, "scale": scale}


def predicted_seconds(table: dict, sites, mask: torch.Tensor) -> float:
    """The table's prediction for the model that keeps `mask` (gate order: the sites')."""
    seconds, offset = table["whole"], 0
    for site in sites:
        entry = table["kinds"][site.kind]
        kept = int(mask[offset:offset + site.num_heads].sum())
        seconds -= entry["per_layer"][entry["units"]] - entry["per_layer"][kept]
        offset += site.num_heads
    return seconds


def even_counts(sites, k: int) -> list[int]:
    """Units per site when k are spread as evenly as the layers allow (each layer's share of its
    units as equal as can be; ties to the first layers). A layer with no units (pruned empty
    before) gets none."""
    counts = [0] * len(sites)
    roomy = [j for j, s in enumerate(sites) if s.num_heads > 0]
    for _ in range(min(k, sum(s.num_heads for s in sites))):
        order = sorted(roomy, key=lambda j: (counts[j] / sites[j].num_heads, j))
        j = next(j for j in order if counts[j] < sites[j].num_heads)
        counts[j] += 1
    return counts


def even_mask(sites, k: int) -> torch.Tensor:
    """k units spread evenly (even_counts), the first of each layer: for sizing k."""
    return torch.tensor([float(u < c) for s, c in zip(sites, even_counts(sites, k)) for u in range(s.num_heads)])
