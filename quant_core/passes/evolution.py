"""Evolutionary search over integer genomes (Q-DiT's group-size search, methods.md §3.2c; reusable by
any method that picks one option per layer under a constraint).

A genome holds one gene per layer, each drawn from that gene's choices. Generation 0 is the seed
genomes plus random valid ones; every later generation is built from the ``top_k`` best genomes seen
so far: ``mutations`` children that resample each gene with probability ``mutation_prob``, and
``crossovers`` children that take each gene from one of two parents, refilled with random genomes
up to ``population``. Invalid children (failing ``constraint``) are redrawn. The fitness is a loss
(lower is better) and is evaluated once per distinct genome.

Runs are deterministic for a seed, show progress, stop at a time budget, and are resumable: with
``state_path`` the full state (population, scores, top-k, generation, RNG state) is written
atomically after every generation and on interruption, and a later call continues from it.

Under torch.distributed every rank runs the same search (same RNG, same populations) and each
generation's new genomes are evaluated round-robin across the ranks, their losses shared
(:func:`..distributed.map_round_robin`); rank 0 alone reads and writes the state file.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .. import distributed as dist
from ..progress import report
Genome = tuple[int, ...]
STATE_VERSION = 1


@dataclass(frozen=True)
class EvolutionSettings:
    """Defaults are Q-DiT's (population 50, top-k 10, 25 mutations with p = 0.1, 25 crossovers)."""

    population: int = 50
    top_k: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    generations: int = 10
    seed: int = 0
    time_budget_s: float | None = None
    max_tries: int = 1000

    def validate(self) -> "EvolutionSettings":
        if self.population < 1 or self.top_k < 1 or self.generations < 1:
            raise ValueError(f"population, top_k and generations must be >= 1, got {self}")
        if self.mutations < 0 or self.crossovers < 0 or self.mutations + self.crossovers > self.population:
            raise ValueError(f"mutations + crossovers ({self.mutations} + {self.crossovers}) must fit in "
                             f"the population ({self.population})")
        if not 0.0 <= self.mutation_prob <= 1.0:
            raise ValueError(f"mutation_prob must be in [0, 1], got {self.mutation_prob}")
        return self


@dataclass
class SearchResult:
    best: Genome
    best_loss: float
    top_k: list[tuple[Genome, float]]
    generations: int  # completed generations
    evaluations: int  # distinct genomes evaluated
    history: list[float] = field(default_factory=list)  # best loss after each generation
    finished: bool = True  # False when stopped by the time budget


class _Search:
    def __init__(self, choices, fitness, constraint, seeds, settings: EvolutionSettings, state_path, progress,
                 context):
        self.context = context
        self.choices = [tuple(int(c) for c in cs) for cs in choices]
        if not self.choices or any(not cs for cs in self.choices):
            raise ValueError("every gene needs at least one choice")
        self.fitness, self.constraint, self.settings = fitness, constraint, settings.validate()
        self.state_path = Path(state_path) if state_path else None
        self.progress = progress
        self.rng = random.Random(settings.seed)
        self.scores: dict[Genome, float] = {}
        self.top: list[Genome] = []
        self.history: list[float] = []
        self.generation = 0
        self.population = self._initial(seeds)

    # -- genomes -------------------------------------------------------------------------------
    def _valid(self, g: Genome) -> bool:
        return all(x in cs for x, cs in zip(g, self.choices)) and len(g) == len(self.choices) and self.constraint(g)

    def _draw(self, make: Callable[[], Genome], what: str) -> Genome:
        for _ in range(self.settings.max_tries):
            g = make()
            if self.constraint(g):
                return g
        raise ValueError(f"search: no {what} genome satisfied the constraint in {self.settings.max_tries} "
                         f"tries; loosen the constraint or widen the choices")

    def _random(self) -> Genome:
        return self._draw(lambda: tuple(self.rng.choice(cs) for cs in self.choices), "random")

    def _mutate(self) -> Genome:
        parent = self.rng.choice(self.top)
        p = self.settings.mutation_prob
        return self._draw(lambda: tuple(self.rng.choice(cs) if self.rng.random() < p else x
                                        for x, cs in zip(parent, self.choices)), "mutated")

    def _crossover(self) -> Genome:
        a, b = self.rng.choice(self.top), self.rng.choice(self.top)
        return self._draw(lambda: tuple(x if self.rng.random() < 0.5 else y for x, y in zip(a, b)), "crossed")

    def _initial(self, seeds) -> list[Genome]:
        pop = []
        for s in seeds:
            g = tuple(int(x) for x in s)
            if not self._valid(g):
                raise ValueError(f"search: seed genome {list(g)} is not valid (choices or constraint)")
            pop.append(g)
        while len(pop) < self.settings.population:
            pop.append(self._random())
        return pop[:self.settings.population]

    def _next_population(self) -> list[Genome]:
        s = self.settings
        pop = [self._mutate() for _ in range(s.mutations)] + [self._crossover() for _ in range(s.crossovers)]
        return pop + [self._random() for _ in range(s.population - len(pop))]

    # -- state ---------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        s = dataclasses.asdict(self.settings)
        for k in ("generations", "time_budget_s"):  # may change between a run and its resumption
            s.pop(k)
        return {"choices": [list(c) for c in self.choices], "settings": s, "context": self.context}

    def save(self) -> None:
        if self.state_path is None:
            return
        from ..serialization import atomic_write_text

        version, internal, gauss = self.rng.getstate()
        state = {"version": STATE_VERSION, "fingerprint": self._fingerprint(), "generation": self.generation,
                 "population": [list(g) for g in self.population], "top_k": [list(g) for g in self.top],
                 "scores": [[list(g), v] for g, v in self.scores.items()], "history": self.history,
                 "rng": [version, list(internal), gauss]}
        atomic_write_text(json.dumps(state), self.state_path)

    @dist.main_only
    def _read_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        try:
            return json.loads(self.state_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.state_path}: not a search state file ({e})") from None

    def load(self) -> bool:
        state = None if self.state_path is None else self._read_state()
        if state is None:
            return False
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_path}: search state version {state.get('version')!r}, "
                             f"expected {STATE_VERSION}")
        if state["fingerprint"] != self._fingerprint():
            raise ValueError(f"{self.state_path}: saved for other choices, settings, weights or conditions; "
                             f"delete it or use another state_path")
        self.generation, self.history = state["generation"], state["history"]
        self.population = [tuple(g) for g in state["population"]]
        self.top = [tuple(g) for g in state["top_k"]]
        self.scores = {tuple(g): v for g, v in state["scores"]}
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        return True

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> SearchResult:
        from tqdm.auto import tqdm

        self.load()
        s = self.settings
        deadline = None if s.time_budget_s is None else time.monotonic() + s.time_budget_s
        finished = True
        bar = tqdm(total=s.generations * s.population, initial=self.generation * s.population,
                   desc="evolutionary search", disable=not self.progress or not dist.is_main())
        try:
            while self.generation < s.generations:
                todo = list(dict.fromkeys(g for g in self.population if g not in self.scores))
                bar.update(len(self.population) - len(todo))
                out_of_time = None if deadline is None else lambda: time.monotonic() > deadline
                for j, (g, loss) in enumerate(dist.map_round_robin(self.fitness, todo, stop=out_of_time)):
                    self.scores[g] = float(loss)
                    report("evolutionary search", self.generation * s.population + j + 1, s.generations * s.population)
                    bar.update(1)
                if any(g not in self.scores for g in todo):
                    finished = False
                    break
                ranked = sorted(set(self.top) | set(self.population), key=lambda g: (self.scores[g], g))
                self.top = ranked[:s.top_k]
                self.history.append(self.scores[self.top[0]])
                self.generation += 1
                bar.set_postfix(best=f"{self.history[-1]:.4g}")
                # always breed the next population, so a finished run can be resumed with more
                # generations and reproduce an uninterrupted run exactly
                self.population = self._next_population()
                self.save()
        finally:
            bar.close()
            self.save()  # keeps evaluated scores when interrupted mid-generation
        if not self.top:
            raise TimeoutError("search: the time budget ran out before the first generation was evaluated; "
                               "resume with the same state_path or give more time")
        return SearchResult(self.top[0], self.scores[self.top[0]], [(g, self.scores[g]) for g in self.top],
                            self.generation, len(self.scores), list(self.history), finished)


def evolutionary_search(choices: Sequence[Sequence[int]], fitness: Callable[[Genome], float], *,
                        constraint: Callable[[Genome], bool] = lambda g: True, seeds: Sequence[Sequence[int]] = (),
                        settings: EvolutionSettings | None = None, state_path=None,
                        progress: bool = True, context: dict | None = None) -> SearchResult:
    """Minimise ``fitness`` over genomes (one value per gene from ``choices[i]``) that satisfy
    ``constraint``; ``seeds`` start the first population (Q-DiT seeds the uniform genome).
    ``context`` (JSON) names what the fitness depends on (the model's weights, the conditions): a
    ``state_path`` saved under another context is refused, not resumed with stale scores.

    >>> r = evolutionary_search([[32, 64, 128]] * 4, lambda g: abs(sum(g) - 300),
    ...                         constraint=lambda g: sum(g) / len(g) >= 64, progress=False)
    """
    return _Search(choices, fitness, constraint, seeds, settings or EvolutionSettings(), state_path, progress,
                   context).run()
