"""Qua²SeDiMo's search (methods.md §5.3): sample and label random configurations, train a GNN
ensemble on the layer graph, score every option assignment of every subgraph, and build a full
configuration at a bit budget from the best-scoring subgraph assignments.

An *assignment* maps each quantized layer to an option name (``"uaq3"``, ``"kmc4"``, ``"kma3"``...).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...progress import report
from . import gnn
from ... import distributed as dist
from .graph import OP_TYPES, LayerGraph, Subgraph
from .options import METHODS, Option, OptionBank

Assignment = dict[str, str]


# -- node features -----------------------------------------------------------------------------------
def node_features(graph: LayerGraph, bank: OptionBank, assignments: Sequence[Assignment],
                  nodes: Sequence[int] | None = None) -> torch.Tensor:
    """``[B, len(nodes), F]``: method one-hot, bits / 8, size share (the option's stored bytes over the
    fp16 bytes of all quantized layers), -log10(relative weight error) / 4, block position, op-type
    one-hot (the paper's [method, bits, size %, error, block, layer type])."""
    nodes = list(range(len(graph.names))) if nodes is None else list(nodes)
    fp16_total = 2 * sum(bank.numel.values())
    static = []
    for i in nodes:
        pos = (graph.blocks[i] + 1) / (graph.num_blocks + 1) if graph.blocks[i] >= 0 else \
            (1.0 if graph.op_types[i] == "ProjOut" else 0.0)
        static.append([pos] + [float(graph.op_types[i] == t) for t in OP_TYPES])
    static_t = torch.tensor(static)
    cache: dict[tuple[int, str], list[float]] = {}
    rows = []
    for a in assignments:
        row = []
        for i in nodes:
            opt = a[graph.names[i]]
            if (i, opt) not in cache:
                e, o = bank.entries[graph.names[i]][opt], Option.parse(opt)
                cache[(i, opt)] = [float(o.method == m) for m in METHODS] + [
                    o.bits / 8, e.nbytes / fp16_total, -math.log10(max(e.error, 1e-12)) / 4]
            row.append(cache[(i, opt)])
        rows.append(row)
    dyn = torch.tensor(rows)
    return torch.cat([dyn, static_t.expand(len(assignments), -1, -1)], dim=-1)


# -- sampling ------------------------------------------------------------------------------------------
def sample_assignment(layers: Sequence[str], options: Sequence[str], index: int, seed: int = 0) -> Assignment:
    """Random configuration ``index`` (deterministic in (seed, index)): a probability vector over the
    bit widths is drawn from a flat Dirichlet (for two widths: p ~ U(0, 1) for the lower one), each
    layer draws its bits from it and a method uniformly."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    opts = [Option.parse(o) for o in options]
    widths = sorted({o.bits for o in opts})
    probs = -torch.rand(len(widths), generator=gen).log()  # Dirichlet(1, ..., 1) from the seeded generator
    probs = probs / probs.sum()
    out = {}
    for name in layers:
        bits = widths[torch.multinomial(probs, 1, generator=gen).item()]
        methods = [o for o in opts if o.bits == bits]
        out[name] = methods[torch.randint(len(methods), (1,), generator=gen).item()].name
    return out


def repair_to_bits(bank: OptionBank, assignment: Assignment, target: float, tol: float, seed: int) -> Assignment:
    """Move a random assignment to ``target`` ± ``tol`` average bits by re-drawing random layers one bit
    width up or down (keeping random methods), for random baselines at a given size."""
    gen = torch.Generator().manual_seed(seed)
    a = dict(assignment)
    widths = sorted({Option.parse(o).bits for o in bank.options})
    methods = sorted({Option.parse(o).method for o in bank.options})
    for _ in range(20 * len(a)):
        bits = bank.bits(a)
        if abs(bits - target) <= tol:
            return a
        name = bank.layers[torch.randint(len(a), (1,), generator=gen).item()]
        w = widths.index(Option.parse(a[name]).bits) + (-1 if bits > target else 1)
        if 0 <= w < len(widths):
            m = methods[torch.randint(len(methods), (1,), generator=gen).item()]
            a[name] = Option(m, widths[w]).name
    raise RuntimeError(f"could not move a random configuration to {target} ± {tol} bits (at {bank.bits(a):.3f})")


# -- labels --------------------------------------------------------------------------------------------
def sqnr_db(loss: float) -> float:
    """Quality of a relative squared error: SQNR in dB (higher is better)."""
    return -10 * math.log10(max(loss, 1e-30))


class Labeller:
    """Quality of a configuration from a fitness of :mod:`..fitness` (``fitness(transformer) -> loss``,
    lower is better, measured against the FP pipeline on fixed prompts/labels and seeds):
    ``SampleFidelity`` (final latents; quality = SQNR dB, the offline default) or ``FIDFitness``
    (``quality=lambda fid: -fid``) when Inception weights are installed. ``settings`` identifies the
    measurement in the label store's fingerprint."""

    def __init__(self, pipe, fitness, settings: dict, quality: Callable[[float], float] = sqnr_db):
        self.pipe, self.fitness, self.settings, self.quality = pipe, fitness, settings, quality

    def __call__(self, bank: OptionBank, assignment: Assignment) -> float:
        from ...models import set_submodule

        model = self.pipe.transformer
        originals = {n: model.get_submodule(n) for n in assignment}
        try:
            bank.install(model, assignment, decoded=bank.act_bits is None)
            return float(self.quality(self.fitness(model)))
        finally:
            for n, m in originals.items():
                set_submodule(model, n, m)


class LabelStore:
    """Labelled configurations in one JSON file, written atomically after each label, so an
    interrupted run resumes where it stopped. ``fingerprint`` ties the file to the layer set,
    options and label settings; a different one is an error rather than a silent mix. Under
    torch.distributed rank 0 alone reads and writes the file; every rank holds the records."""

    def __init__(self, path: str | Path | None, fingerprint: str):
        self.path, self.fingerprint = (Path(path) if path else None), fingerprint
        self.records: dict[int, dict] = self._read() if self.path else {}

    @dist.main_only
    def _read(self) -> dict[int, dict]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        if data.get("fingerprint") != self.fingerprint:
            raise ValueError(f"{self.path}: labels were made with other layers/options/settings "
                             f"(fingerprint {data.get('fingerprint')} != {self.fingerprint}); use another workdir")
        return {int(k): v for k, v in data["records"].items()}

    def add(self, index: int, record: dict) -> None:
        from ...serialization import atomic_write_text

        self.records[index] = record
        if self.path:
            atomic_write_text(json.dumps({"fingerprint": self.fingerprint, "records": self.records}), self.path)


def fingerprint(bank: OptionBank, settings: dict) -> str:
    blob = json.dumps({"layers": bank.layers, "options": bank.options, "act_bits": bank.act_bits,
                       "weights_sha256": bank.weights_sha256, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def label_configs(bank: OptionBank, labeller: Callable[[OptionBank, Assignment], float], store: LabelStore, indices: Sequence[int], *,
                  seed: int = 0, progress: bool = True, deadline: float | None = None) -> dict[int, dict]:
    """Label random configurations ``indices`` (skipping those in ``store``). Under torch.distributed
    the labels are computed round-robin across the ranks and every rank receives all of them.
    Independent workers can also split the indices (e.g. ``range(k, n, workers)``) with one store
    each; :func:`merge_stores` joins them. Past ``deadline`` (``time.monotonic()``) labelling stops
    and only the labels done are returned."""
    from tqdm.auto import tqdm

    def label(i: int) -> dict:
        a = sample_assignment(bank.layers, bank.options, i, seed)
        start = time.perf_counter()
        return {"assignment": a, "quality": labeller(bank, a), "bits": bank.bits(a),
                "seconds": time.perf_counter() - start}

    todo = [i for i in indices if i not in store.records]
    out_of_time = None if deadline is None else lambda: time.monotonic() > deadline
    with tqdm(total=len(todo), desc="qua2sedimo labels", disable=not progress or not dist.is_main(),
              leave=False) as bar:
        for i, record in dist.map_round_robin(label, todo, stop=out_of_time):
            store.add(i, record)
            bar.update(1)
            report("qua2sedimo labels", len(store.records), len(indices))
    return {i: store.records[i] for i in indices if i in store.records}


def merge_stores(paths: Sequence[str | Path], fingerprint_: str) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for p in paths:
        merged.update(LabelStore(p, fingerprint_).records)
    return merged


# -- predictor ensemble --------------------------------------------------------------------------------
@dataclass
class Ensemble:
    models: list[gnn.GraphRegressor]
    hop_srcc: list[list[float]]    # per fold, per hop: validation Spearman of the hop embedding norm
    val_srcc: list[float]          # per fold: validation Spearman of the prediction
    y_mean: float
    y_std: float

    def predict(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        adj = gnn.with_self_loops(adj)
        with torch.no_grad():
            return torch.stack([m(x, adj)[0] for m in self.models]).mean(0) * self.y_std + self.y_mean


def train_ensemble(x: torch.Tensor, adj: torch.Tensor, y: torch.Tensor, *, folds: int = 5, seed: int = 0,
                   progress: bool = True, **train_kwargs) -> Ensemble:
    """k-fold ensemble: fold f trains on the other folds and is validated on fold f."""
    from tqdm.auto import tqdm

    if x.shape[0] < 2 * folds:
        raise ValueError(f"need at least {2 * folds} labelled configurations for {folds} folds, got {x.shape[0]}")
    y_mean, y_std = y.mean().item(), y.std().clamp_min(1e-8).item()
    ys = (y - y_mean) / y_std
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    parts = perm.tensor_split(folds)
    models, hop_srcc, val_srcc = [], [], []
    for f in tqdm(range(folds), desc="qua2sedimo predictor", disable=not progress, leave=False):
        val = parts[f]
        tr = torch.cat([p for g, p in enumerate(parts) if g != f])
        m = gnn.train(x[tr], adj, ys[tr], seed=seed + f, **train_kwargs)
        models.append(m)
        hop_srcc.append(gnn.hop_correlations(m, x[val], adj, ys[val]))
        with torch.no_grad():
            val_srcc.append(gnn.spearman(m(x[val], gnn.with_self_loops(adj))[0], ys[val]))
    return Ensemble(models, hop_srcc, val_srcc, y_mean, y_std)


# -- subgraph scoring and construction ---------------------------------------------------------------
@dataclass
class SubgraphScores:
    subgraph: Subgraph
    assignments: list[tuple[str, ...]]   # option per node of the subgraph, all combinations
    scores: torch.Tensor                  # [A]
    nbytes: torch.Tensor                  # [A] stored bytes of the subgraph's layers


def score_subgraphs(graph: LayerGraph, bank: OptionBank, ens: Ensemble, *, max_assignments: int = 200_000,
                    chunk: int = 4096) -> list[SubgraphScores]:
    """Score every option assignment of every subgraph (§5.3 step 5): the subgraph alone goes through
    each fold's GNN; its score is the L1 norm of the graph embedding at the subgraph's hop level,
    standardised over all assignments scored at that hop, times the fold's validation Spearman for
    that hop, summed over folds."""
    options = bank.options
    raw = []
    for i, sg in enumerate(graph.subgraphs):
        report("qua2sedimo scoring", i, len(graph.subgraphs))
        combos = len(options) ** len(sg.nodes)
        if combos > max_assignments:
            raise ValueError(f"subgraph {sg.name} has {combos} assignments (> {max_assignments}); use fewer options")
        assigns = list(itertools.product(options, repeat=len(sg.nodes)))
        names = [graph.names[i] for i in sg.nodes]
        adj = gnn.with_self_loops(graph.adj[sg.nodes][:, sg.nodes])
        hop = min(sg.hop, len(ens.models[0].convs)) - 1
        per_fold = torch.zeros(len(ens.models), len(assigns))
        for start in range(0, len(assigns), chunk):
            part = assigns[start:start + chunk]
            x = node_features(graph, bank, [dict(zip(names, a)) for a in part], sg.nodes)
            with torch.no_grad():
                for f, m in enumerate(ens.models):
                    per_fold[f, start:start + len(part)] = m(x, adj)[1][hop].abs().sum(-1)
        nbytes = torch.tensor([sum(bank.entries[n][o].nbytes for n, o in zip(names, a)) for a in assigns],
                              dtype=torch.float64)
        raw.append((sg, assigns, per_fold, hop, nbytes))
    out = []
    for sg, assigns, per_fold, hop, nbytes in raw:
        same_hop = torch.cat([r[2] for r in raw if r[3] == hop], dim=1)
        mean, std = same_hop.mean(1, keepdim=True), same_hop.std(1, keepdim=True).clamp_min(1e-12)
        weight = torch.tensor([ens.hop_srcc[f][hop] for f in range(len(ens.models))]).nan_to_num(0.0)
        score = (((per_fold - mean) / std) * weight.unsqueeze(1)).sum(0)
        out.append(SubgraphScores(sg, assigns, score, nbytes))
    return out


def construct(graph: LayerGraph, bank: OptionBank, scored: list[SubgraphScores], target_bits: float) -> Assignment:
    """One assignment per subgraph maximising the summed score under the byte budget of
    ``target_bits`` (§5.3 step 6, with the budget made explicit): for a price ``lam`` on bytes every
    subgraph independently takes its best ``score - lam * bytes`` assignment; ``lam`` is bisected to the
    cheapest price that fits, then leftover bytes buy the best score-per-byte upgrades that still fit."""
    budget = target_bits * sum(bank.numel.values()) / 8

    def pick(lam: float) -> list[int]:
        return [int((s.scores.double() - lam * s.nbytes).argmax()) for s in scored]

    def total(choice) -> float:
        return sum(float(s.nbytes[c]) for s, c in zip(scored, choice))

    cheapest = [int(s.nbytes.argmin()) for s in scored]
    if total(cheapest) > budget:
        raise ValueError(f"target {target_bits} bits is below the smallest configuration "
                         f"({8 * total(cheapest) / sum(bank.numel.values()):.3f} bits)")
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 2
    if total(pick(lo)) > budget:
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
    choice = pick(hi) if total(pick(lo)) > budget else pick(lo)
    while True:  # greedy upgrades into the remaining budget
        spent, best = total(choice), None
        for k, s in enumerate(scored):
            gain = s.scores.double() - s.scores[choice[k]].double()
            extra = s.nbytes - s.nbytes[choice[k]]
            ok = (gain > 0) & (spent + extra <= budget)
            if ok.any():
                ratio = torch.where(ok, gain / extra.clamp_min(1.0), torch.tensor(-1.0, dtype=torch.float64))
                c = int(ratio.argmax())
                if best is None or ratio[c] > best[0]:
                    best = (float(ratio[c]), k, c)
        if best is None:
            break
        choice[best[1]] = best[2]
    out: Assignment = {}
    for s, c in zip(scored, choice):
        out.update({graph.names[i]: o for i, o in zip(s.subgraph.nodes, s.assignments[c])})
    return out


@dataclass
class SearchReport:
    num_labels: int
    test_srcc: float
    val_srcc: list[float]
    hop_srcc: list[list[float]]
    seconds: dict[str, float] = field(default_factory=dict)


def evaluate_holdout(ens: Ensemble, x: torch.Tensor, adj: torch.Tensor, y: torch.Tensor) -> float:
    return gnn.spearman(ens.predict(x, adj), y)



def contextual_scores(graph: LayerGraph, bank: OptionBank, ens: Ensemble, base: Assignment,
                      template: list[SubgraphScores], chunk: int = 512) -> list[SubgraphScores]:
    """Re-score every assignment of every subgraph by the ensemble's predicted quality of the whole
    configuration ``base`` with only that subgraph changed (our refinement, not in the paper: it trades
    subgraphs against each other in the predictor's own units)."""
    out = []
    for s in template:
        names = [graph.names[i] for i in s.subgraph.nodes]
        preds = []
        for start in range(0, len(s.assignments), chunk):
            configs = [{**base, **dict(zip(names, a))} for a in s.assignments[start:start + chunk]]
            preds.append(ens.predict(node_features(graph, bank, configs), graph.adj))
        out.append(SubgraphScores(s.subgraph, s.assignments, torch.cat(preds), s.nbytes))
    return out


def refine(graph: LayerGraph, bank: OptionBank, ens: Ensemble, start: Assignment, template: list[SubgraphScores],
           target_bits: float, rounds: int = 2) -> Assignment:
    """Rounds of budgeted construction on contextual scores around the current configuration; keeps
    the configuration the ensemble predicts best (the start included)."""
    def predicted(a: Assignment) -> float:
        return ens.predict(node_features(graph, bank, [a]), graph.adj).item()

    best, best_q, current = start, predicted(start), start
    for _ in range(rounds):
        current = construct(graph, bank, contextual_scores(graph, bank, ens, current, template), target_bits)
        q = predicted(current)
        if q > best_q:
            best, best_q = current, q
    return best
