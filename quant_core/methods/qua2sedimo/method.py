"""Qua²SeDiMo (Mills et al., AAAI 2025): sensitivity-driven mixed-precision weights (methods.md §5).

Two steps, because labelling configurations needs the whole pipeline, not just the transformer. The
public story runs the search inside ``calibrate`` (its result travels in the calibration data):

>>> cfg = QuantConfig.preset("qua2sedimo-w3.5")
>>> calib = calibrate(pipe, prompts, config=cfg, workdir="q2s")   # the search, labelling on prompts
>>> quantize(pipe.transformer, cfg, calib)                         # installs the searched assignment

Researchers call :func:`search` directly (``result.config`` carries the assignment in its options).
The options ``time_budget_s`` (stop labelling after that long; the labels so far are kept in the
workdir and a re-run resumes) and the small settings of :data:`SMALL` (seconds on the built-in PixArt,
for tests) bound its cost.

``search`` builds every layer's options once (:mod:`..qua2sedimo_options`), labels random
configurations by fidelity to the FP pipeline, trains a GATv2 ensemble over the layer graph, scores
every option assignment of every subgraph, and takes the best per subgraph under the byte budget of
``target_bits``. The method pass then rebuilds the chosen option of each layer (deterministic, so it
matches what the search measured) and records the assignment in the checkpoint.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config_search as qs
from ... import distributed as dist
from ...calibration import SEARCH
from ...config import QuantConfig, check_options, register_preset
from ...models import select_layers
from ...serialization import layers_sha256
from .graph import build_graph
from .options import METHOD_NAMES, Option, OptionBank, build_option, option_grid
from .. import register_method

# The small setting of the preset: minutes on a CPU for the built-in PixArt (docs/qua2sedimo.md).
DEFAULTS = {
    "target_bits": 3.5, "bits": [3, 4], "methods": ["uaq", "kmc", "kma"],
    "num_configs": 80, "holdout": 0.2, "seed": 0,
    "label_prompts": ["a red fox in snow", "a city at night"], "label_steps": 4, "label_seed": 0,
    "label_metric": "fidelity",
    "folds": 5, "epochs": 300, "hidden": 64, "gnn_layers": 4, "lr": 1e-3, "weight_decay": 1e-6,
    "batch_size": 128, "rank_weight": 1.0, "bits_weight": 0.0, "refine_rounds": 2, "time_budget_s": None,
}
# Documented small settings (QuantConfig.preset(name, small=True)): a search of seconds on the built-in
# PixArt, for tests and smoke runs; its assignment is far from the preset's.
SMALL = {"num_configs": 12, "label_steps": 2, "folds": 2, "epochs": 40, "hidden": 16, "gnn_layers": 2,
         "refine_rounds": 0, "holdout": 0.0}


def settings(config: QuantConfig) -> dict:
    check_options(config, set(DEFAULTS) | {"assignment"})
    return {**DEFAULTS, **config.options}


def act_bits_of(config: QuantConfig) -> int | None:
    if config.act_mode not in (None, "dynamic_token"):
        raise ValueError(f"qua2sedimo supports weight-only or dynamic per-token activations, "
                         f"got act_mode {config.act_mode!r}")
    return config.act_bits


@register_method("qua2sedimo")
class Qua2SeDiMo:
    def needs(self, config: QuantConfig) -> tuple[str, ...]:
        return () if config.options.get("assignment") else (SEARCH,)

    def search(self, pipe, config: QuantConfig, prompts: list, *, workdir=None, progress: bool = True,
               call_kwargs: dict | None = None) -> dict:
        """The search as ``calibrate`` runs it: labels on ``prompts``, sampling with ``call_kwargs`` (the
        pipeline's keyword arguments; default: the built-in PixArt's or DiT's); returns what ``apply`` reads."""
        from ...sampling import DIT_CALL, PIXART_CALL, takes_prompts

        call = call_kwargs or (PIXART_CALL if takes_prompts(pipe) else DIT_CALL)
        result = search(pipe, config, workdir=workdir, progress=progress, call_kwargs=call, conditions=prompts)
        return {"assignment": result.assignment, "avg_bits": result.avg_bits,
                "num_labels": result.report.num_labels, "seconds": result.report.seconds}

    def apply(self, ctx) -> None:
        assignment = ctx.config.options.get("assignment") or searched_assignment(ctx.calibration)
        missing = [n for n in ctx.layers if n not in assignment]
        extra = [n for n in assignment if n not in ctx.layers]
        if missing or extra:
            raise ValueError(f"qua2sedimo assignment does not match the model's layers: missing {missing[:3]}, "
                             f"unknown {extra[:3]} (searched on another model or include/exclude?)")
        act_bits = act_bits_of(ctx.config)
        nbytes = numel = 0
        for name, _ in ctx.iter_layers("qua2sedimo"):
            mod = build_option(ctx.linear(name), Option.parse(assignment[name]), name=name, act_bits=act_bits)
            nbytes, numel = nbytes + mod.weight_nbytes(), numel + ctx.linear(name).weight.numel()
            ctx.replace(name, mod)
        ctx.method_state.update({"assignment": dict(assignment), "avg_bits": 8 * nbytes / numel})


def searched_assignment(calibration) -> dict[str, str]:
    found = (calibration.meta.get("search") or {}) if calibration is not None else {}
    if found.get("method") != "qua2sedimo" or not found.get("assignment"):
        raise ValueError("qua2sedimo quantizes with a searched assignment, and this calibration holds none: "
                         "run calib = calibrate(pipe, prompts, config=cfg) with the qua2sedimo config (it runs "
                         "the search), then quantize(model, cfg, calib)")
    return found["assignment"]


@dataclass
class SearchResult:
    config: QuantConfig          # the input config with options["assignment"] filled in
    assignment: dict[str, str]
    avg_bits: float
    bank: OptionBank
    labels: dict[int, dict]
    ensemble: qs.Ensemble
    scored: list[qs.SubgraphScores]
    report: qs.SearchReport
    graph: object


def search(pipe, config: QuantConfig, *, workdir: str | Path | None = None, progress: bool = True,
           call_kwargs: dict | None = None, labeller: qs.Labeller | None = None,
           conditions: list | None = None) -> SearchResult:
    """Run the Qua²SeDiMo search on ``pipe`` (its transformer stays full precision) and return the
    configuration to quantize with. With ``workdir`` the option bank, the labels (resumable), the
    insight plots and table are written there. ``conditions`` (prompts or class labels) replace the
    options' ``label_prompts``."""
    s = settings(config)
    times: dict[str, float] = {}
    start = time.perf_counter()
    model = pipe.transformer
    layers = select_layers(model, config)
    options = option_grid(tuple(s["bits"]), tuple(s["methods"]))
    work = Path(workdir) if workdir else None
    bank_path = work / "options.safetensors" if work else None
    found = bank_path is not None and bank_path.exists()
    dist.barrier()  # every rank looked before rank 0 may write it below
    if found:
        bank = OptionBank.load(bank_path)
        if bank.layers != list(layers) or bank.options != [o.name for o in options] or bank.act_bits != act_bits_of(config):
            raise ValueError(f"{bank_path} holds options for other layers/options; use another workdir")
        if bank.weights_sha256 != layers_sha256(model, layers):
            raise ValueError(f"{bank_path} holds options built from other weights (another model or "
                             f"fine-tune); use another workdir")
    else:
        bank = OptionBank.build(model, layers, options, act_bits=act_bits_of(config), progress=progress)
        if bank_path:
            bank.save(bank_path)
    times["options"] = time.perf_counter() - start

    start = time.perf_counter()
    if labeller is None:
        labeller = default_labeller(pipe, s if conditions is None else {**s, "label_prompts": conditions}, call_kwargs)
    fp = qs.fingerprint(bank, {**labeller.settings, "sample_seed": s["seed"]})
    store = qs.LabelStore(work / "labels.json" if work else None, fp)
    deadline = None if s["time_budget_s"] is None else time.monotonic() + s["time_budget_s"]
    labels = qs.label_configs(bank, labeller, store, range(s["num_configs"]), seed=s["seed"], progress=progress,
                              deadline=deadline)
    if len(labels) < s["num_configs"] and len(labels) < max(2 * s["folds"], 4):
        raise TimeoutError(f"qua2sedimo: the time budget (time_budget_s={s['time_budget_s']}) ran out after "
                           f"{len(labels)} of {s['num_configs']} labels, too few to train the predictor; "
                           + ("run again with the same workdir to resume" if work else
                              "give more time, or a workdir so a re-run resumes"))
    times["labels"] = time.perf_counter() - start

    start = time.perf_counter()
    graph = build_graph(layers)
    ens, report = fit_predictor(graph, bank, labels, s, progress)
    times["predictor"] = time.perf_counter() - start

    start = time.perf_counter()
    scored = qs.score_subgraphs(graph, bank, ens)
    assignment = qs.construct(graph, bank, scored, s["target_bits"])
    if s["refine_rounds"]:
        assignment = qs.refine(graph, bank, ens, assignment, scored, s["target_bits"], s["refine_rounds"])
    times["construct"] = time.perf_counter() - start
    report.seconds = times
    out = QuantConfig.from_dict({**config.to_dict(), "options": {**config.options, "assignment": assignment}})
    result = SearchResult(out, assignment, bank.bits(assignment), bank, labels, ens, scored, report, graph)
    if work:
        dist.main_only(write_insights)(result, work)
    return result


def default_labeller(pipe, s: dict, call_kwargs: dict | None) -> qs.Labeller:
    """Fidelity of the final latents to the FP pipeline (SampleFidelity), or FID against the FP
    samples when ``label_metric="fid"`` and Inception weights are installed (fitness.inception_features)."""
    from ...sampling import PIXART_CALL
    from ...passes.fitness import FIDFitness, SampleFidelity, inception_features

    call = dict(call_kwargs if call_kwargs is not None else PIXART_CALL, num_inference_steps=s["label_steps"])
    conditions, seed = s["label_prompts"], s["label_seed"]
    settings = {"conditions": [str(c) for c in conditions], "seed": seed, "metric": s["label_metric"],
                "call": {k: str(v) for k, v in sorted(call.items())}}
    if s["label_metric"] == "fidelity":
        return qs.Labeller(pipe, SampleFidelity(pipe, conditions, call, seed=seed), settings)
    if s["label_metric"] == "fid":
        features = inception_features()
        if features is None:
            raise ValueError("label_metric='fid' needs torch-fidelity and Inception weights "
                             "($DITQ_INCEPTION_WEIGHTS); use label_metric='fidelity' offline")
        return qs.Labeller(pipe, FIDFitness(pipe, conditions, call, features, seed=seed), settings,
                           quality=lambda fid: -fid)
    raise ValueError(f"qua2sedimo: label_metric must be 'fidelity' or 'fid', got {s['label_metric']!r}")


def fit_predictor(graph, bank: OptionBank, labels: dict[int, dict], s: dict, progress: bool):
    """Hold out ``holdout`` of the labels for the reported rank correlation, k-fold ensemble on the rest.
    The regression target is ``quality - bits_weight * avg_bits`` (the README's trade-off form)."""
    keys = sorted(labels)
    x = qs.node_features(graph, bank, [labels[k]["assignment"] for k in keys])
    y = torch.tensor([labels[k]["quality"] - s["bits_weight"] * labels[k]["bits"] for k in keys])
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(s["seed"]))
    n_test = int(round(s["holdout"] * len(keys)))
    test, train = perm[:n_test], perm[n_test:]
    ens = qs.train_ensemble(x[train], graph.adj, y[train], folds=s["folds"], seed=s["seed"], progress=progress,
                            epochs=s["epochs"], hidden=s["hidden"], layers=s["gnn_layers"], lr=s["lr"],
                            weight_decay=s["weight_decay"], batch_size=s["batch_size"], rank_weight=s["rank_weight"])
    test_srcc = qs.evaluate_holdout(ens, x[test], graph.adj, y[test]) if n_test >= 2 else float("nan")
    return ens, qs.SearchReport(len(keys), test_srcc, ens.val_srcc, ens.hop_srcc)


# -- explainability: plots and table --------------------------------------------------------------------
def option_preferences(result: SearchResult) -> dict[str, dict[str, float]]:
    """Mean score per (op type, option): each subgraph's scores averaged over the assignments in which
    a node of that op type takes that option — which method and bits suit which operation."""
    sums: dict[str, Counter] = {}
    counts: dict[str, Counter] = {}
    for sc in result.scored:
        for pos, node in enumerate(sc.subgraph.nodes):
            kind = result.graph.op_types[node]
            sums.setdefault(kind, Counter())
            counts.setdefault(kind, Counter())
            for a, v in zip(sc.assignments, sc.scores.tolist()):
                sums[kind][a[pos]] += v
                counts[kind][a[pos]] += 1
    return {k: {o: sums[k][o] / counts[k][o] for o in result.bank.options} for k in sums}


def write_insights(result: SearchResult, folder: str | Path) -> dict[str, Path]:
    """``scores_by_subgraph.png`` (box plot of the score distribution of every block's SA/CA/FFN and the
    embedders), ``scores_by_optype.png``, ``choices_by_optype.png`` (chosen method/bits per op type
    across blocks), ``insights.md`` (table) and ``search.json``."""
    from ...plotting import box_plot, stacked_bars
    from ...serialization import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = result.graph
    paths = {k: folder / f for k, f in (("subgraphs", "scores_by_subgraph.png"), ("optypes", "scores_by_optype.png"),
                                        ("choices", "choices_by_optype.png"), ("table", "insights.md"),
                                        ("json", "search.json"))}
    box_plot({sc.subgraph.name: sc.scores.tolist() for sc in result.scored},
             "Qua2SeDiMo subgraph scores (all option assignments)", paths["subgraphs"])
    prefs = option_preferences(result)
    by_type: dict[str, list[float]] = {}
    for sc in result.scored:
        for node in sc.subgraph.nodes:
            by_type.setdefault(g.op_types[node], []).extend(sc.scores.tolist())
    box_plot(by_type, "Scores of assignments containing each op type", paths["optypes"])
    types = sorted({g.op_types[i] for i in range(len(g.names))})
    opts = result.bank.options
    chosen = {o: [sum(1 for i, n in enumerate(g.names) if g.op_types[i] == t and result.assignment[n] == o)
                  for t in types] for o in opts}
    stacked_bars(types, chosen, f"Chosen option per op type ({result.avg_bits:.2f} bits)", paths["choices"],
                 ylabel="layers")
    lines = [f"# Qua²SeDiMo search: {result.avg_bits:.3f} average bits over {len(g.names)} layers",
             "", f"{result.report.num_labels} labelled configurations; held-out Spearman "
             f"{result.report.test_srcc:.3f}; fold validation Spearman "
             + ", ".join(f"{v:.2f}" for v in result.report.val_srcc), "",
             "## Chosen assignment per subgraph", "", "| subgraph | layers (option) | score |", "|---|---|---|"]
    for sc in result.scored:
        picked = tuple(result.assignment[g.names[i]] for i in sc.subgraph.nodes)
        score = sc.scores[sc.assignments.index(picked)].item()
        layer_txt = ", ".join(f"{g.op_types[i]} {result.assignment[g.names[i]]}" for i in sc.subgraph.nodes)
        lines.append(f"| {sc.subgraph.name} | {layer_txt} | {score:.2f} |")
    lines += ["", "## Mean score per op type and option (higher = better suited)", "",
              "| op type | " + " | ".join(f"{METHOD_NAMES[Option.parse(o).method]} {Option.parse(o).bits}b"
                                         for o in opts) + " |", "|---|" + "---|" * len(opts)]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(f"{prefs[t][o]:.2f}" for o in opts) + " |")
    atomic_write_text("\n".join(lines) + "\n", paths["table"])
    atomic_write_text(json.dumps({"assignment": result.assignment, "avg_bits": result.avg_bits,
                                         "test_srcc": result.report.test_srcc, "val_srcc": result.report.val_srcc,
                                         "hop_srcc": result.report.hop_srcc, "seconds": result.report.seconds},
                                        indent=1), paths["json"])
    return paths


def _preset(act_bits: int | None):
    return lambda: QuantConfig(method="qua2sedimo", weight_bits=4, act_bits=act_bits,
                               act_mode="dynamic_token" if act_bits else None, include=[".*"],
                               options=dict(DEFAULTS))


register_preset("qua2sedimo-w3.5", _preset(None), quick=False, small=SMALL)
register_preset("qua2sedimo-w3.5a8", _preset(8), quick=False, small=SMALL)
