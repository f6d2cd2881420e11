"""``crystallm mcts``: Monte-Carlo tree search over the model's token tree for low-scoring structures.

A node is a token sequence (the prompt at the root); its children are the model's top-k next tokens
with their probabilities as priors. One step of the search runs ``R`` iterations together:

1. **select** ``R`` leaves, descending by PUCT, UCT or greedy value; each descent puts a virtual
   loss on its path so the next descents of the step spread over other leaves;
2. **expand** the distinct leaves: one batched forward pass over their (right-padded) prefixes gives
   each leaf's next-token distribution, from which its children are made;
3. **roll out** every selected leaf to a finished CIF with the batched, cached :class:`Sampler`
   (``R`` completions in one call);
4. **evaluate**: post-process each CIF, look it up in the transposition cache (keyed by the
   post-processed text), check the validity of new ones, and score the valid new ones in one call
   to the scorer. Invalid CIFs get a penalty and never reach the scorer;
5. **back-propagate** the outcomes along the selected paths, removing the virtual losses.

Steps are pipelined (``pipeline``, on by default): step ``t``'s evaluation runs on a worker thread
while step ``t + 1`` selects, expands and rolls out, its paths still carrying step ``t``'s virtual
losses; step ``t`` is backed up before step ``t + 1`` is evaluated. Selection thus sees statistics
one step old, the scorer and the model work at the same time, and a search stays deterministic by
seed: what each step sees does not depend on timing.

Rewards are min-max normalised over the scores seen so far, at selection time: a node keeps the
raw sum of its scores, and since the normalisation is affine, the mean of the normalised rewards is
the normalised mean score. Every value in the tree therefore uses the same, current scale. When
the tree outgrows ``max_nodes``, the least-visited expanded subtrees are collapsed back into leaves
(they keep their statistics and can be expanded again). Details and formulas: docs/MCTS.md.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import heapq
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crystallm_core.events import JsonlSink, ProgressReporter, open_sink
from crystallm_core.model import GPT
from crystallm_core.postprocess import postprocess
from crystallm_core.sampler import Sampler, SamplingParams
from crystallm_core.scorers import Scorer, ScorerError, score_checked
from crystallm_core.validity import Validity, check
from crystallm_core.vocab import Vocabulary

SELECTORS = ("puct", "uct", "greedy")
INVALID_REWARD = -1.0  # invalid CIFs and CIFs the scorer could not score; valid ones lie in [0, 1]
VIRTUAL_LOSS = -1.0  # the reward a pending (selected, not yet evaluated) visit counts as
EXPAND_CHUNK = 32  # prefixes per forward pass when expanding leaves


@dataclass(frozen=True)
class MctsConfig:
    iterations: int = 256  # rollouts in total (the last step may run fewer than rollouts_per_step)
    rollouts_per_step: int = 16
    selector: str = "puct"
    c: float = 1.0  # exploration constant
    top_k: int = 10  # children per node, and the rollouts' top-k
    min_prior: float = 0.01  # children less probable than this are not made (the most probable always is)
    temperature: float = 1.0  # of the rollouts
    max_nodes: int = 200_000
    max_tokens: int | None = None  # new tokens per rollout after its leaf (default: up to the context)
    seed: int = 0
    best: int = 5  # best structures written as .cif files
    check_workers: int = 1  # processes for validity checks
    pipeline: bool = True  # evaluate step t while step t + 1 rolls out (module docstring)

    def __post_init__(self) -> None:
        problems = []
        if self.iterations < 1:
            problems.append(f"--iterations must be >= 1, got {self.iterations}")
        if self.rollouts_per_step < 1:
            problems.append(f"--rollouts-per-step must be >= 1, got {self.rollouts_per_step}")
        if self.selector not in SELECTORS:
            problems.append(f"--selector must be one of {', '.join(SELECTORS)}, got {self.selector!r}")
        if not (self.c >= 0 and math.isfinite(self.c)):
            problems.append(f"--c must be a finite number >= 0, got {self.c}")
        if self.top_k < 1:
            problems.append(f"--top-k must be >= 1, got {self.top_k}")
        if not 0 <= self.min_prior < 1:
            problems.append(f"--min-prior must be in [0, 1), got {self.min_prior}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if self.max_nodes < self.min_nodes:
            problems.append(
                f"--max-nodes must be >= 1 + top_k * (rollouts_per_step + 1) = {self.min_nodes} "
                f"(the root's children plus one step's expansions), got {self.max_nodes}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.best < 0:
            problems.append(f"--best must be >= 0, got {self.best}")
        if self.check_workers < 1:
            problems.append(f"--check-workers must be >= 1, got {self.check_workers}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def min_nodes(self) -> int:
        return 1 + self.top_k * (self.rollouts_per_step + 1)


class Node:
    """One token in the tree. ``children`` is None until the node is expanded (and after a collapse)."""

    __slots__ = ("token", "parent", "prior", "depth", "children", "terminal", "n", "pending", "score_sum", "n_scored")

    def __init__(self, token: int, parent: Node | None, prior: float, depth: int) -> None:
        self.token, self.parent, self.prior, self.depth = token, parent, prior, depth
        self.children: list[Node] | None = None
        self.terminal = False  # <eos> (a finished CIF) or the context is full
        self.n = 0  # evaluated visits
        self.pending = 0  # selected in this step, not yet evaluated (virtual loss)
        self.score_sum = 0.0  # raw scores of the scored visits
        self.n_scored = 0  # visits that got a score; the others (n - n_scored) were penalised


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one CIF: a score, or the reason it has none (invalid or the scorer failed)."""

    valid: bool
    score: float | None = None
    error: str | None = None


@dataclass
class SearchStats:
    steps: int = 0
    rollouts: int = 0
    nodes: int = 1
    peak_nodes: int = 1
    max_depth: int = 0
    expansions: int = 0
    pruned_nodes: int = 0
    prunes: int = 0
    scorer_calls: int = 0
    cifs_scored: int = 0
    cifs_checked: int = 0
    invalid: int = 0
    scorer_failures: int = 0
    cache_hits: int = 0
    best_score: float | None = None
    seconds: float = 0.0
    seconds_rollout: float = 0.0
    seconds_expand: float = 0.0
    seconds_check: float = 0.0
    seconds_score: float = 0.0
    seconds_waiting: float = 0.0  # the search waited for an evaluation (pipelined: the part not overlapped)
    error: str | None = None

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.seconds if self.seconds else 0.0

    @property
    def scored_per_s(self) -> float:
        return self.cifs_scored / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rollouts_per_s": self.rollouts_per_s, "scored_per_s": self.scored_per_s}


@dataclass
class Best:
    """The lowest-scoring structures found, best first."""

    keep: int
    heap: list[tuple[float, str, str]] = field(default_factory=list)  # (-score, id, cif): a max-heap of scores

    def offer(self, score: float, cif_id: str, cif: str) -> None:
        item = (-score, cif_id, cif)
        if len(self.heap) < self.keep:
            heapq.heappush(self.heap, item)
        elif self.keep and item > self.heap[0]:
            heapq.heapreplace(self.heap, item)

    def ranked(self) -> list[tuple[float, str, str]]:
        return [(-s, i, c) for s, i, c in sorted(self.heap, reverse=True)]


class Tree:
    """The search tree with PUCT/UCT/greedy selection, virtual loss, and collapse-based pruning."""

    def __init__(self, prompt: list[int], cfg: MctsConfig, vocab: Vocabulary, max_len: int) -> None:
        self.prompt, self.cfg, self.max_len = prompt, cfg, max_len
        self.eos = vocab.eos_id
        self.banned = {vocab.pad_id, vocab.unk_id}
        self.root = Node(-1, None, 1.0, 0)
        self.size = 1
        self.max_depth = 0
        self.lo = math.inf  # lowest and highest score seen: the normalisation
        self.hi = -math.inf

    # -------------------------------------------------------- values

    def norm(self, score: float) -> float:
        """Min-max normalised reward of a score: 1 for the best (lowest) seen, 0 for the worst."""
        return (self.hi - score) / (self.hi - self.lo) if self.hi > self.lo else 0.5

    def value(self, node: Node, virtual: bool = True) -> float | None:
        """Mean reward of a node's visits (with ``virtual``, pending ones count as losses); None if none."""
        pending = node.pending if virtual else 0
        visits = node.n + pending
        if not visits:
            return None
        total = node.n_scored * self.norm(node.score_sum / node.n_scored) if node.n_scored else 0.0
        total += (node.n - node.n_scored) * INVALID_REWARD + pending * VIRTUAL_LOSS
        return total / visits

    def _pick(self, node: Node) -> Node:
        children = node.children
        assert children
        parent_visits = node.n + node.pending
        fpu = self.value(node, virtual=False)  # first-play urgency: an unvisited child is valued as its parent
        fpu = 0.0 if fpu is None else fpu
        c, selector = self.cfg.c, self.cfg.selector
        best, best_key = children[0], None
        sqrt_n = math.sqrt(parent_visits)
        log_n = math.log(parent_visits) if parent_visits > 0 else 0.0
        for ch in children:
            visits = ch.n + ch.pending
            q = self.value(ch)
            q = fpu if q is None else q
            if selector == "puct":
                u = q + c * ch.prior * sqrt_n / (1 + visits)
            elif selector == "uct":
                u = q + c * math.sqrt(log_n / visits) if visits else math.inf
            else:
                u = q
            key = (u, ch.prior, -ch.token)  # ties: the more probable token, then the lower id
            if best_key is None or key > best_key:
                best, best_key = ch, key
        return best

    def select(self) -> Node:
        """Descend to a leaf (unexpanded or terminal) and put a virtual loss on the path."""
        node = self.root
        while node.children and not node.terminal:
            node = self._pick(node)
        walk: Node | None = node
        while walk is not None:
            walk.pending += 1
            walk = walk.parent
        return node

    def tokens(self, node: Node) -> list[int]:
        """The token sequence of a node (prompt included)."""
        out = []
        while node.parent is not None:
            out.append(node.token)
            node = node.parent
        return self.prompt + out[::-1]

    # -------------------------------------------------------- growth

    def expand(self, node: Node, probs: torch.Tensor) -> None:
        """Children of ``node`` from its next-token distribution: top-k, less the banned and the improbable."""
        k = min(self.cfg.top_k + len(self.banned), probs.shape[-1])
        values, ids = torch.topk(probs, k)
        picked = [(p, t) for p, t in zip(values.tolist(), ids.tolist()) if t not in self.banned][: self.cfg.top_k]
        kept = [pt for pt in picked if pt[0] >= self.cfg.min_prior] or picked[:1]
        total = sum(p for p, _ in kept) or 1.0
        depth = node.depth + 1
        node.children = []
        for p, t in kept:
            child = Node(t, node, p / total, depth)
            child.terminal = t == self.eos or len(self.prompt) + depth >= self.max_len - 1
            node.children.append(child)
        self.size += len(kept)
        self.max_depth = max(self.max_depth, depth)

    def backup(self, leaf: Node, outcome: Outcome) -> None:
        if outcome.score is not None:
            self.lo, self.hi = min(self.lo, outcome.score), max(self.hi, outcome.score)
        node: Node | None = leaf
        while node is not None:
            node.pending -= 1
            node.n += 1
            if outcome.score is not None:
                node.score_sum += outcome.score
                node.n_scored += 1
            node = node.parent

    def prune(self, target: int) -> int:
        """Collapse the least-visited expanded subtrees (deepest first among equals) until at most
        ``target`` nodes remain; the root stays expanded. Returns the number of nodes removed.

        A node has at least as many visits as any of its descendants, so in this order every
        descendant comes before its ancestors: no candidate lies inside a subtree collapsed earlier.
        """
        candidates = []
        stack = [self.root]
        while stack:
            for ch in stack.pop().children or ():
                if ch.children:
                    candidates.append(ch)
                    stack.append(ch)
        candidates.sort(key=lambda nd: (nd.n, -nd.depth))
        removed = 0
        for node in candidates:
            if self.size <= target:
                break
            gone = self._subtree_size(node) - 1
            node.children = None
            self.size -= gone
            removed += gone
        return removed

    @staticmethod
    def _subtree_size(node: Node) -> int:
        count, stack = 0, [node]
        while stack:
            nd = stack.pop()
            count += 1
            stack.extend(nd.children or ())
        return count


@torch.no_grad()
def next_token_probs(model: GPT, prefixes: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Next-token probabilities (float32, CPU) after each prefix: right-padded batches, one forward each.

    Causal attention means the padding after a prefix cannot change its last position's logits.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prefixes), EXPAND_CHUNK):
        chunk = prefixes[start : start + EXPAND_CHUNK]
        lengths = torch.tensor([len(p) for p in chunk])
        idx = torch.full((len(chunk), int(lengths.max())), pad, dtype=torch.long)
        for i, p in enumerate(chunk):
            idx[i, : len(p)] = torch.tensor(p)
        logits, _ = model(idx.to(device))
        last = logits[torch.arange(len(chunk), device=device), lengths.to(device) - 1]
        out.append(last.float().softmax(-1).cpu())
    return torch.cat(out)


class Checker:
    """Validity checks, in this process or on a persistent pool of workers forked from a clean server."""

    def __init__(self, workers: int) -> None:
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
            if "forkserver" in methods:
                ctx.set_forkserver_preload(["crystallm_core.validity"])
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx)

    def __call__(self, texts: list[str]) -> list[Validity]:
        if self.pool is None or len(texts) < 2:
            return [check(t) for t in texts]
        return list(self.pool.map(check, texts, chunksize=max(1, len(texts) // 16)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


class _Records:
    """``cifs.csv.gz``: one row per distinct CIF evaluated (id, step, valid, score, error, cif), flushed per step."""

    COLUMNS = ("id", "step", "valid", "score", "error", "cif")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = gzip.open(path, "wt", newline="", encoding="utf-8")  # noqa: SIM115 (open for the whole search)
        self._writer = csv.writer(self._fh)
        self._writer.writerow(self.COLUMNS)

    def write(self, cif_id: str, step: int, outcome: Outcome, cif: str) -> None:
        score = "" if outcome.score is None else repr(outcome.score)
        self._writer.writerow([cif_id, step, int(outcome.valid), score, outcome.error or "", cif])

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class Search:
    """One search from one prompt. :meth:`run` returns the statistics; outputs go to ``out`` if given.
    A ``checker`` may be shared by several searches (its worker pool then starts once)."""

    def __init__(
        self,
        model: GPT,
        vocab: Vocabulary,
        scorer: Scorer,
        prompt: list[int],
        cfg: MctsConfig,
        out: Path | None = None,
        sink: JsonlSink | None = None,
        checker: Checker | None = None,
    ) -> None:
        self.model, self.vocab, self.scorer, self.cfg, self.out, self.sink = model, vocab, scorer, cfg, out, sink
        self.max_len = model.cfg.block_size
        if not 1 <= len(prompt) < self.max_len - 1:
            raise ValueError(f"prompt has {len(prompt)} tokens; the model's context holds {self.max_len}")
        self.tree = Tree(prompt, cfg, vocab, self.max_len)
        self.sampler = Sampler(model, vocab, batch_size=cfg.rollouts_per_step, max_len=self.max_len)
        self.cache: dict[bytes, Outcome] = {}  # post-processed CIF digest -> outcome (the transposition cache)
        self.best = Best(cfg.best)
        self.stats = SearchStats()
        self.own_checker = checker is None  # a caller's checker (shared by several searches) is left open
        self.checker = checker or Checker(cfg.check_workers)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        self.records = _Records(out / "cifs.csv.gz") if out is not None else None
        self.evaluator = ThreadPoolExecutor(1, thread_name_prefix="mcts-eval") if cfg.pipeline else None
        self.in_flight: tuple[list[Node], Future[list[Outcome]]] | None = None  # a step being evaluated

    def run(self) -> SearchStats:
        t0 = time.perf_counter()
        try:
            self._expand([self.tree.root])
            with ProgressReporter(self.sink, "mcts", self.cfg.iterations) as progress:
                while self.stats.rollouts < self.cfg.iterations:
                    n = min(self.cfg.rollouts_per_step, self.cfg.iterations - self.stats.rollouts)
                    self.step(n)
                    self.stats.seconds = time.perf_counter() - t0
                    self._report()
                    progress.update(self.stats.rollouts)
            self._back_up_in_flight()
        except ScorerError as exc:
            self.stats.error = str(exc)
        finally:
            if self.evaluator is not None:
                self.evaluator.shutdown(wait=True)  # no evaluation may outlive the records file or the checker
            self.stats.seconds = time.perf_counter() - t0
            if self.own_checker:
                self.checker.close()
            if self.records is not None:
                self.records.close()
        if self.out is not None:
            self._write_outputs()
        return self.stats

    def step(self, n: int) -> None:
        """Select ``n`` leaves, expand them, roll out; back up the step in flight; evaluate this one
        (on the worker thread when pipelined, else here, backing it up at once); then prune if needed.

        Pruning may collapse the subtree of a leaf still being evaluated: its back-up then walks the
        detached nodes and the ancestors still in the tree, whose counts stay right.
        """
        tree, st = self.tree, self.stats
        leaves = [tree.select() for _ in range(n)]
        distinct = list({id(leaf): leaf for leaf in leaves if leaf.children is None and not leaf.terminal}.values())
        self._expand(distinct)
        texts = self._rollouts(leaves)
        self._back_up_in_flight()
        if self.evaluator is not None:
            self.in_flight = (leaves, self.evaluator.submit(self._evaluate, texts, st.steps))
        else:
            for leaf, outcome in zip(leaves, self._evaluate(texts, st.steps)):
                tree.backup(leaf, outcome)
        st.steps += 1
        st.rollouts += n
        room = self.cfg.max_nodes - self.cfg.top_k * self.cfg.rollouts_per_step  # the next step's expansions fit
        if tree.size > room:
            low_water = max(1 + self.cfg.top_k, int(0.75 * room))
            st.pruned_nodes += tree.prune(low_water)
            st.prunes += 1
        st.nodes = tree.size
        st.peak_nodes = max(st.peak_nodes, tree.size)
        st.max_depth = tree.max_depth

    def _back_up_in_flight(self) -> None:
        """Wait for the step being evaluated (re-raising its ScorerError) and back up its outcomes."""
        if self.in_flight is None:
            return
        leaves, future = self.in_flight
        self.in_flight = None
        t = time.perf_counter()
        outcomes = future.result()
        self.stats.seconds_waiting += time.perf_counter() - t
        for leaf, outcome in zip(leaves, outcomes):
            self.tree.backup(leaf, outcome)

    def _expand(self, nodes: list[Node]) -> None:
        if not nodes:
            return
        t = time.perf_counter()
        probs = next_token_probs(self.model, [self.tree.tokens(nd) for nd in nodes], self.vocab.pad_id)
        for node, p in zip(nodes, probs):
            self.tree.expand(node, p)
        self.stats.expansions += len(nodes)
        self.stats.peak_nodes = max(self.stats.peak_nodes, self.tree.size)
        self.stats.seconds_expand += time.perf_counter() - t

    def _rollouts(self, leaves: list[Node]) -> list[str]:
        """Post-processed CIF text of each leaf's completion; a terminal leaf is its own completion."""
        t = time.perf_counter()
        prefixes = [self.tree.tokens(leaf) for leaf in leaves]
        todo = [i for i, leaf in enumerate(leaves) if not leaf.terminal]
        finished: dict[int, list[int]] = {i: prefixes[i] for i, leaf in enumerate(leaves) if leaf.terminal}
        if todo:
            params = SamplingParams(
                temperature=self.cfg.temperature,
                top_k=self.cfg.top_k,
                max_tokens=self.cfg.max_tokens or self.max_len,
                seed=self.cfg.seed * 1_000_003 + self.stats.steps,
            )
            outputs, _ = self.sampler.generate([prefixes[i] for i in todo], params)
            finished.update(zip(todo, outputs))
        self.stats.seconds_rollout += time.perf_counter() - t
        return [postprocess(self.vocab.decode(finished[i])) for i in range(len(leaves))]

    def _evaluate(self, texts: list[str], step: int) -> list[Outcome]:
        """Outcome per text: cached, else checked, and if valid scored (all new valid ones in one call).

        Pipelined, this runs on the worker thread; it alone touches the cache, the records and the best.
        """
        st = self.stats
        keys = [_digest(t) for t in texts]
        new: dict[bytes, int] = {}  # first index of each CIF not in the cache
        for i, key in enumerate(keys):
            if key not in self.cache and key not in new:
                new[key] = i
        st.cache_hits += len(texts) - len(new)
        t = time.perf_counter()
        verdicts = self.checker([texts[i] for i in new.values()])
        st.seconds_check += time.perf_counter() - t
        st.cifs_checked += len(verdicts)
        outcomes: dict[bytes, Outcome] = {}
        to_score: list[bytes] = []
        for key, verdict in zip(new, verdicts):
            if verdict.is_valid:
                to_score.append(key)
            else:
                outcomes[key] = Outcome(False, error="; ".join(verdict.codes) or "invalid")
                st.invalid += 1
        if to_score:
            t = time.perf_counter()
            st.scorer_calls += 1
            st.cifs_scored += len(to_score)
            try:
                results = score_checked(self.scorer, [texts[new[k]] for k in to_score])
            finally:
                st.seconds_score += time.perf_counter() - t
            for key, result in zip(to_score, results):
                outcomes[key] = Outcome(True, result.score, result.error)
                st.scorer_failures += not result.ok
        for key, i in new.items():
            outcome = outcomes[key]
            self.cache[key] = outcome
            cif_id = f"s{step:05d}-{i:03d}"
            if self.records is not None:
                self.records.write(cif_id, step, outcome, texts[i])
            if outcome.score is not None:
                self.best.offer(outcome.score, cif_id, texts[i])
                st.best_score = outcome.score if st.best_score is None else min(st.best_score, outcome.score)
        if self.records is not None:
            self.records.flush()
        return [self.cache[k] for k in keys]

    def _report(self) -> None:
        if self.sink is None:
            return
        st = self.stats
        values = dict(
            rollouts=st.rollouts,
            nodes=st.nodes,
            max_depth=st.max_depth,
            cifs_scored=st.cifs_scored,
            invalid=st.invalid,
            cache_hits=st.cache_hits,
            rollouts_per_s=st.rollouts_per_s,
            scored_per_s=st.scored_per_s,
        )
        if st.best_score is not None:
            values["best_score"] = st.best_score
        self.sink.metric(st.steps, **values)

    def _write_outputs(self) -> None:
        assert self.out is not None
        best_dir = self.out / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        best = []
        for rank, (score, cif_id, cif) in enumerate(self.best.ranked(), 1):
            path = best_dir / f"{rank:02d}.cif"
            path.write_text(cif, encoding="utf-8")
            best.append({"rank": rank, "id": cif_id, "score": score, "file": str(path.relative_to(self.out))})
        self.stats.max_depth = self.tree.max_depth
        stats = {"config": asdict(self.cfg), "stats": self.stats.to_dict(), "best": best}
        (self.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
        if self.sink is not None:
            self.sink.artifact(self.out / "cifs.csv.gz", "samples")
            if best:
                self.sink.artifact(best_dir, "samples")
            self.sink.artifact(self.out / "stats.json", "report")


# ---------------------------------------------------------------- the verb


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    p.add_argument("--prompt", required=True, help="composition, e.g. Ba2Ti2O6 (cell counts)")
    p.add_argument("--spacegroup", default=None, help="space group to put in the prompt (symbol or number)")
    p.add_argument("--scorer", required=True, help="registered scorer (crystallm plugins list)")
    p.add_argument("--scorer-option", action="append", default=[], metavar="K=V", help="scorer option, repeatable")
    d = MctsConfig()
    p.add_argument("--iterations", type=int, default=d.iterations, help="rollouts in total")
    p.add_argument(
        "--selector", default=d.selector, choices=SELECTORS, help=f"child selection rule (default {d.selector})"
    )
    p.add_argument("--c", type=float, default=d.c, help="exploration constant")
    p.add_argument("--top-k", type=int, default=d.top_k, help="children per node and the rollouts' top-k")
    p.add_argument("--min-prior", type=float, default=d.min_prior, help="smallest probability that makes a child")
    p.add_argument("--rollouts-per-step", type=int, default=d.rollouts_per_step, help="leaves rolled out together")
    p.add_argument("--max-nodes", type=int, default=d.max_nodes, help="tree size limit (pruned beyond)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="of the rollouts")
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per rollout (default: to the context)")
    p.add_argument("--best", type=int, default=d.best, help="best structures written as .cif files")
    p.add_argument("--check-workers", type=int, default=None, help="validity-check processes (default: cores, <= 8)")
    p.add_argument(
        "--no-pipeline",
        dest="pipeline",
        action="store_false",
        help="evaluate each step before selecting the next (no overlap of scoring with rollouts)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the search and its rollouts (default {d.seed})")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--smoke", action="store_true", help="at most 8 rollouts, 4 per step")


def _error(message: str) -> int:
    print(f"crystallm mcts: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from crystallm_core.prompts import PromptError, make_prompt
    from crystallm_core.sample import load_for_inference
    from crystallm_core.scorers import make_scorer, parse_options

    try:
        cfg = MctsConfig(
            iterations=min(args.iterations, 8) if args.smoke else args.iterations,
            rollouts_per_step=min(args.rollouts_per_step, 4) if args.smoke else args.rollouts_per_step,
            selector=args.selector,
            c=args.c,
            top_k=args.top_k,
            min_prior=args.min_prior,
            temperature=args.temperature,
            max_nodes=args.max_nodes,
            max_tokens=args.max_tokens,
            seed=args.seed,
            best=args.best,
            check_workers=args.check_workers or max(1, min(8, os.cpu_count() or 1)),
            pipeline=args.pipeline,
        )
        options = parse_options(args.scorer_option, "--scorer-option")
    except ValueError as exc:
        return _error(str(exc))
    try:
        prompt_text = make_prompt(args.prompt, args.spacegroup)
    except PromptError as exc:
        return _error(f"--prompt: {exc}")
    try:
        model, vocab, _ = load_for_inference(args.model, args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        return _error(f"--model: {exc}")
    device = next(model.parameters()).device
    try:
        scorer = make_scorer(args.scorer, options, device=str(device), seed=args.seed)
    except ScorerError as exc:
        return _error(f"--scorer: {exc}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with open_sink(out) as sink:
            search = Search(model, vocab, scorer, vocab.encode(prompt_text), cfg, out=out, sink=sink)
            stats = search.run()
    except ValueError as exc:
        return _error(str(exc))
    finally:
        scorer.close()
    best = "none" if stats.best_score is None else f"{stats.best_score:.4f}"
    print(
        f"{stats.rollouts} rollouts in {stats.seconds:.1f} s ({stats.rollouts_per_s:.2f}/s), "
        f"{stats.cifs_scored} scored, {stats.invalid} invalid, {stats.cache_hits} cache hits, "
        f"{stats.nodes} nodes (depth {stats.max_depth}); best score {best} -> {out}"
    )
    if stats.error:
        print(f"crystallm mcts: search stopped: {stats.error}", file=sys.stderr)
        return 1
    return 0
