"""Stage kinds: what a plan's ``kind`` means and which command lines a stage runs.

A kind is a pydantic model for its ``params``, a builder turning validated params plus the
stage's context into a :class:`Command` (a short sequence of argv lists run one after the other,
plus small files written into the stage's working directory first), and default resources. Built-in
kinds run ``crystallm`` verbs as subprocesses; plugins add kinds with :func:`register_stage` (the node and
``infra-train`` load them: ``infra.node.stage_plugins``).

Every stage writes where the experiment record's layout says (``crystallm_core/layout.py``): the node fills
the :class:`StageContext` from it (this module cannot import it: the master imports this one). Plans name
the few experiment-wide folders (``data``, ``ckpts``, ``probes``) in params; later stages name earlier
products with paths relative to the experiment directory:

- prepare: ``data/`` (``data/selection.json`` included); the demo set first goes to
  ``artifacts/<stage>/demo.csv.gz``; runs [``crystallm demo-data``], ``crystallm prepare``
- train: the experiment directory is its ``out_dir``: ``ckpts/{last,best}.pt``, ``plots/``,
  ``probes/<probe>/``; runs ``crystallm train work/<stage>/train.json``, with ``--resume`` on a retry
  that finds ``ckpts/last.pt``, under ``torch.distributed.run`` when its world size (GPUs or ``processes``)
  is above 1 (docs/DISTRIBUTED.md)
- sample, mcts, benchmark: ``samples/<stage>/``; run ``crystallm sample|mcts|benchmark csp``
- evaluate: ``artifacts/<stage>/evaluation.jsonl`` (per-CIF results); runs ``crystallm evaluate``
- merge: what the sharded stage it stands for writes, from its parts' folders; runs ``crystallm merge``
- analyze: ``plots/<probe>/`` (ΦID tables and heatmaps); runs ``crystallm probes analyze``
- plot: ``plots/`` (training curves); runs ``crystallm plot``

A stage process runs in ``work/<stage>/`` (scratch), with its events in ``metrics/<stage>.jsonl`` and
its output in ``logs/<stage>.log`` (``node/runner.py``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

# The experiment-wide folders that plans name (param defaults, the folders a kind owns): names of the
# experiment record (crystallm_core/layout.py; the master imports this module and never crystallm_core, and a
# test checks they agree). Every other path comes in the StageContext.
DATA, CKPTS, PROBES = "data", "ckpts", "probes"


# Bounds of the numbers in built-in params: a count fits an int32 (argparse, torch sizes, the verbs' own
# types) and a seed numpy's 32-bit seeds; floats are finite (Spec). A larger value is a field-named error
# at submit, never an overflow inside a stage.
MAX_COUNT = 2**31 - 1
MAX_SEED = 2**32 - 1
MAX_WORKERS = 4096


def _int64(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise ValueError(f"integer {value} is out of range (a 64-bit integer: -2**63 to 2**63-1)")
    return value


Setting = Annotated[str | int | float | bool, BeforeValidator(_int64)]


class Spec(BaseModel):
    """Base of every plan model: strict types and no unknown keys (a typo is an error, never ignored)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def _experiment_path(value: str) -> str:
    """Normalise a path relative to the experiment directory; refuse anything that could leave it."""
    if not value or value.startswith("~") or PurePosixPath(value).is_absolute() or "\\" in value:
        raise ValueError(f"path {value!r} must be relative to the experiment directory")
    parts: list[str] = []
    for part in PurePosixPath(value).parts:
        if part == "..":
            if not parts:
                raise ValueError(f"path {value!r} escapes the experiment directory (and so the workdir)")
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise ValueError(f"path {value!r} names the experiment directory itself, not an artifact in it")
    return "/".join(parts)


def _input_path(value: str) -> str:
    if not value.strip():
        raise ValueError("empty path")
    return value


ExperimentPath = Annotated[str, AfterValidator(_experiment_path)]
"""An artifact of this experiment, e.g. ``ckpts/best.pt`` (relative, may not escape the experiment)."""
InputPath = Annotated[str, AfterValidator(_input_path)]
"""External input data (absolute, or relative to where the plan is submitted from)."""


@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    cpus: float = 1.0
    memory_mib: int = 2048
    processes: int = 1  # CPU processes of a kind that runs several (``StageKind.processes``); see world_size
    nodes: int = 1  # machines of a gang (a multi-node stage); each member gets all of the above


def world_size(r: Resources) -> int:
    """How many processes a multi-process stage starts on one node: one per GPU when it has several, else
    ``processes`` (CPU processes, gloo; what tests use). A gang starts this many on each of its nodes."""
    return r.gpus if r.gpus > 1 else max(1, r.processes)


@dataclass(frozen=True)
class Rendezvous:
    """How the members of a gang find each other: ``torch.distributed.run``'s static rendezvous, whose store
    member 0's node hosts at ``endpoint`` (``host:port``, the port chosen by the master)."""

    endpoint: str
    nnodes: int
    node_rank: int
    run_id: str


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs and writes: plain data, absolute paths on the machine running it. The node and
    ``infra-train`` fill it from the experiment layout (``infra.node.runner.stage_context``); a builder uses
    these paths and never spells the layout itself."""

    experiment_dir: Path
    stage: str
    work_dir: Path  # the stage process's working directory (scratch; ``files`` of its Command go here)
    data_dir: Path
    ckpts_dir: Path
    probes_dir: Path
    samples_dir: Path  # this stage's own folder of samples
    artifacts_dir: Path  # this stage's products that have no folder of their own (a plugin's outputs, reports)
    smoke: bool = False
    attempt: int = 1
    processes: int = 1  # processes on this node (world_size of its resources); used by kinds with ``processes``
    rendezvous: Rendezvous | None = None  # this node's place in a gang (a multi-node stage); None: one node

    def artifact(self, rel: str) -> str:
        """An experiment-relative path (a param) as an absolute one."""
        return str(self.experiment_dir / rel)

    def rel(self, path: Path) -> str:
        """An absolute path inside the experiment as the experiment-relative path :class:`Command` outputs use."""
        return path.relative_to(self.experiment_dir).as_posix()


@dataclass(frozen=True)
class Command:
    """What a stage runs: ``files`` (name relative to the work dir -> text) are written, then each argv of
    ``steps`` runs in order in ``work/<stage>/``; the first failing step ends the stage.

    ``outputs`` are the experiment-relative paths the stage writes (``data``, ``samples/<stage>``, ...).
    With ``fresh_dir`` a retry starts clean: the runner keeps what the earlier attempt left (its work dir,
    log, metrics file and these outputs) under names with ``.attempt-<n>``; without it a retry continues
    in place (e.g. to resume from a checkpoint)."""

    steps: list[list[str]]
    files: dict[str, str] = field(default_factory=dict)
    fresh_dir: bool = True
    outputs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path in self.outputs:
            if _experiment_path(path) != path:
                raise ValueError(f"stage output {path!r} must be a normalised path relative to the experiment")


@dataclass(frozen=True)
class StageKind:
    params: type[BaseModel]
    build: Callable[[Any, StageContext], Command]
    resources: Resources = Resources()
    verbs: tuple[str, ...] = ()  # crystallm verbs it runs; a node offers the kind only if all exist
    input_fields: tuple[str, ...] = ()  # params holding external input paths (made absolute on submit)
    extras: Callable[[Any], set[str]] | None = None  # optional features a node needs for these params
    description: str = ""
    owns: tuple[str, ...] = ()  # experiment-wide folders it writes (not per stage): one such stage per plan
    processes: bool = False  # runs ``StageContext.processes`` processes (torchrun); others always run one
    merge: str | None = None  # ``crystallm merge`` kind of its outputs: a plan may shard such a stage (``shards``)


_KINDS: dict[str, tuple[StageKind, str]] = {}


def register_stage(name: str, kind: StageKind, *, replace: bool = False) -> StageKind:
    """Add a stage kind; a second registration under the same name is an error unless ``replace``."""
    if not name or not name.replace("-", "_").isidentifier():
        raise ValueError(f"stage kind name {name!r} must be a word (letters, digits, '_' or '-')")
    source = getattr(kind.build, "__module__", "") or ""
    if name in _KINDS and not replace and _KINDS[name][0] is not kind:
        raise ValueError(f"stage kind {name!r} is already registered by {_KINDS[name][1]}")
    _KINDS[name] = (kind, source)
    return kind


def get_stage_kind(name: str) -> StageKind:
    try:
        return _KINDS[name][0]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(sorted(_KINDS)) or 'none'}") from None


def stage_kinds() -> list[str]:
    return sorted(_KINDS)


def crystallm(verb: str, *args: str) -> list[str]:
    """The argv of a ``crystallm`` verb, run with the same interpreter as the caller."""
    return [sys.executable, "-m", "crystallm_core.cli", verb, *args]


def torchrun(n: int, argv: list[str], rdzv: Rendezvous | None = None) -> list[str]:
    """``argv`` (a ``python -m MODULE ...`` line of :func:`crystallm`) launched as ``n`` processes on this
    machine by ``torch.distributed.run``; itself when ``n`` is 1 and there is no gang. Alone, ``--standalone``
    (a free rendezvous port of its own, so two such stages on one machine do not collide); as member
    ``node_rank`` of a gang, the static rendezvous at ``rdzv.endpoint`` (member 0's node hosts the store
    there). Each rank sees the stage's ``CUDA_VISIBLE_DEVICES`` and takes its ``LOCAL_RANK``-th GPU."""
    if n <= 1 and rdzv is None:
        return argv
    python, flag, module, *rest = argv
    if flag != "-m":
        raise ValueError(f"torchrun launches a module (python -m MODULE ...), not {argv!r}")
    if rdzv is None:
        where = ["--standalone"]
    else:
        host, _, port = rdzv.endpoint.rpartition(":")
        where = ["--nnodes", str(rdzv.nnodes), "--node-rank", str(rdzv.node_rank), "--rdzv-id", rdzv.run_id]
        where += ["--master-addr", host.strip("[]"), "--master-port", port]
    return [python, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(n), "-m", module, *rest]


def _opt(flag: str, value: object) -> list[str]:
    return [] if value is None else [flag, str(value)]


def _smoke(ctx: StageContext) -> list[str]:
    return ["--smoke"] if ctx.smoke else []


DEFAULT_MODEL = f"{CKPTS}/best.pt"  # written at every validation that improved (or when there is none)
MAX_SHARDS = 256  # parts of one sharded stage (a plan's ``shards``)


class ShardSpec(Spec):
    """Which part of a sharded stage this stage runs (``crystallm VERB --shard index/count``); the plan's
    ``shards`` sets it on the stages it makes."""

    index: int = Field(ge=0, lt=MAX_SHARDS)
    count: int = Field(ge=1, le=MAX_SHARDS)

    @model_validator(mode="after")
    def _index_below_count(self) -> ShardSpec:
        if self.index >= self.count:
            raise ValueError(f"index {self.index} must be below count {self.count}")
        return self


def _shard(p: Any) -> list[str]:
    return [] if p.shard is None else ["--shard", f"{p.shard.index}/{p.shard.count}"]


# --- prepare ---------------------------------------------------------------------------------


class DemoSpec(Spec):
    n: int = Field(200, ge=1, le=MAX_COUNT)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # a subset of the demo prototypes (crystallm_core/demo.py, which names an unknown one); default: all
    prototypes: list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]] | None = Field(
        None, min_length=1, max_length=64
    )


class PrepareParams(Spec):
    inputs: list[InputPath] = []
    demo: DemoSpec | None = None
    decimals: int = Field(4, ge=0, le=12)
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    dedup: bool = False
    split: list[Annotated[float, Field(ge=0, le=1e6)]] | None = Field(None, min_length=3, max_length=3)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    where: dict[str, str] = {}
    augment: int = Field(0, ge=0, le=16)  # crystallm_core.augment.AUGMENT_MAX (spec imports no crystallm_core)

    @model_validator(mode="after")
    def _some_input(self) -> PrepareParams:
        if not self.inputs and self.demo is None:
            raise ValueError("give 'inputs' (structure files) or 'demo' ({n, seed}) or both")
        return self


def _build_prepare(p: PrepareParams, ctx: StageContext) -> Command:
    steps = []
    inputs = list(p.inputs)
    outputs = [ctx.rel(ctx.data_dir)]
    if p.demo is not None:
        raw = str(ctx.artifacts_dir / "demo.csv.gz")
        chosen = _opt("--prototypes", None if p.demo.prototypes is None else ",".join(p.demo.prototypes))
        steps.append(crystallm("demo-data", "--out", raw, "--n", str(p.demo.n), "--seed", str(p.demo.seed), *chosen))
        inputs.append(raw)
        outputs.append(ctx.rel(ctx.artifacts_dir))
    args = [*inputs, "--out", str(ctx.data_dir), "--decimals", str(p.decimals)]
    args += _opt("--workers", p.workers) + (["--dedup"] if p.dedup else [])
    args += _opt("--split", None if p.split is None else ",".join(f"{x:g}" for x in p.split))
    args += _opt("--seed", p.seed) + (["--augment", str(p.augment)] if p.augment else [])
    for key, value in p.where.items():
        args += ["--where", f"{key}={value}"]
    steps.append(crystallm("prepare", *args, *_smoke(ctx)))
    return Command(steps, outputs=outputs)


# --- train -----------------------------------------------------------------------------------


class TrainParams(Spec):
    data_dir: ExperimentPath = DATA
    config: InputPath | None = None
    model: Literal["tiny", "small", "large"] | None = None
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT)
    batch_size: int | None = Field(None, ge=1, le=MAX_COUNT)
    overrides: dict[str, Setting] = {}
    probes: list[dict[str, Any]] | None = None  # activation probes (docs/OBSERVABILITY.md), checked by train
    resume: bool = False


def _setting(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _build_train(p: TrainParams, ctx: StageContext) -> Command:
    """The experiment directory is train's ``out_dir`` (ckpts/, plots/, probes/ land where the layout says).
    A retry (a failed attempt, or a node that was lost) continues from the last checkpoint when the earlier
    attempt left one: ``--resume``, in place. With a world size above 1 (``ctx.processes``: the stage's GPUs, or
    its CPU ``processes``) it runs under ``torch.distributed.run`` (:func:`torchrun`)."""
    settings: dict[str, Any] = {"data_dir": ctx.artifact(p.data_dir), "out_dir": str(ctx.experiment_dir)}
    settings.update(
        {k: v for k, v in (("model", p.model), ("max_steps", p.max_steps), ("batch_size", p.batch_size)) if v}
    )
    if p.probes is not None:
        settings["probes"] = p.probes
    settings.update(p.overrides)
    resume = p.resume or (ctx.attempt > 1 and (ctx.ckpts_dir / "last.pt").is_file())
    flags = (["--resume"] if resume else []) + _smoke(ctx)
    outputs = [ctx.rel(ctx.ckpts_dir), ctx.rel(ctx.probes_dir)]
    if p.config is not None:  # the user's config file, with the stage's settings as key=value overrides
        overrides = (f"{k}={_setting(v)}" for k, v in settings.items())
        argv = torchrun(ctx.processes, crystallm("train", p.config, *overrides, *flags), ctx.rendezvous)
        return Command([argv], fresh_dir=not resume, outputs=outputs)
    config = ctx.work_dir / "train.json"
    files = {"train.json": json.dumps(settings, indent=2)}
    argv = torchrun(ctx.processes, crystallm("train", str(config), *flags), ctx.rendezvous)
    return Command([argv], files=files, fresh_dir=not resume, outputs=outputs)


# --- sample ----------------------------------------------------------------------------------


class SampleParams(Spec):
    model: ExperimentPath = DEFAULT_MODEL
    prompt: str | None = None
    prompts: InputPath | None = None
    spacegroup: str | None = None
    num_samples: int | None = Field(None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(None, gt=0, le=1000)
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_COUNT)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    shard: ShardSpec | None = None

    @model_validator(mode="after")
    def _one_prompt_source(self) -> SampleParams:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a formula) and 'prompts' (a file)")
        return self


def _build_sample(p: SampleParams, ctx: StageContext) -> Command:
    args = ["--model", ctx.artifact(p.model)]
    args += ["--prompt", p.prompt] if p.prompt is not None else ["--prompts", str(p.prompts)]
    args += _opt("--spacegroup", p.spacegroup) + _opt("--num-samples", p.num_samples)
    args += _opt("--temperature", p.temperature) + _opt("--top-k", p.top_k) + _opt("--top-p", p.top_p)
    args += _opt("--max-tokens", p.max_tokens) + _opt("--seed", p.seed)
    argv = crystallm("sample", *args, "--out", str(ctx.samples_dir), *_shard(p), *_smoke(ctx))
    return Command([argv], outputs=[ctx.rel(ctx.samples_dir)])


# --- mcts ------------------------------------------------------------------------------------

EXTRA_SCORERS = {"chgnet": "chgnet", "oid": "oid"}  # scorer name -> optional feature a node must have
SCORER_EXTRA = "scorer:"  # a node lists "scorer:NAME" for every scorer registered there (plugins included)


class MctsParams(Spec):
    model: ExperimentPath = DEFAULT_MODEL
    prompt: str
    scorer: str
    scorer_options: dict[str, str] = {}
    iterations: int | None = Field(None, ge=1, le=MAX_COUNT)
    selector: Literal["puct", "uct", "greedy"] | None = None
    c: float | None = Field(None, ge=0, le=1e6)
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT)
    rollouts_per_step: int | None = Field(None, ge=1, le=MAX_COUNT)
    max_nodes: int | None = Field(None, ge=1, le=MAX_COUNT)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    pipeline: bool = True  # false: --no-pipeline, each step evaluated before the next is selected


def _build_mcts(p: MctsParams, ctx: StageContext) -> Command:
    args = ["--model", ctx.artifact(p.model), "--prompt", p.prompt, "--scorer", p.scorer]
    for key, value in p.scorer_options.items():
        args += ["--scorer-option", f"{key}={value}"]
    args += _opt("--iterations", p.iterations) + _opt("--selector", p.selector) + _opt("--c", p.c)
    args += _opt("--top-k", p.top_k) + _opt("--rollouts-per-step", p.rollouts_per_step)
    args += _opt("--max-nodes", p.max_nodes) + _opt("--seed", p.seed) + ([] if p.pipeline else ["--no-pipeline"])
    argv = crystallm("mcts", *args, "--out", str(ctx.samples_dir), *_smoke(ctx))
    return Command([argv], outputs=[ctx.rel(ctx.samples_dir)])


def _mcts_extras(p: MctsParams) -> set[str]:
    """The scorer must be registered on the node (built-in or plugin), and some need an installed package."""
    return {SCORER_EXTRA + p.scorer} | ({EXTRA_SCORERS[p.scorer]} if p.scorer in EXTRA_SCORERS else set())


# --- benchmark -------------------------------------------------------------------------------


class BenchmarkParams(Spec):
    """``test`` names the test structures, or ``test_split`` a split of this experiment's prepared data set
    (``data/``): a held-out part of an input that has no test file of its own."""

    task: Literal["csp"] = "csp"
    model: ExperimentPath = DEFAULT_MODEL
    test: InputPath | None = None
    test_split: Literal["train", "val", "test"] | None = None
    n: int = Field(20, ge=1, le=MAX_COUNT)
    limit: int | None = Field(None, ge=1, le=MAX_COUNT)
    temperature: float | None = Field(None, gt=0, le=1000)
    top_k: int | None = Field(None, ge=1, le=MAX_COUNT)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    shard: ShardSpec | None = None

    @model_validator(mode="after")
    def _one_test(self) -> BenchmarkParams:
        if self.test is None and self.test_split is None:
            raise ValueError("missing test: give test (a file of test structures) or test_split (a split of data/)")
        if self.test is not None and self.test_split is not None:
            raise ValueError("give test (a file of test structures) or test_split (a split of data/), not both")
        return self


def _build_benchmark(p: BenchmarkParams, ctx: StageContext) -> Command:
    test = (
        ["--test", p.test] if p.test is not None else ["--test", ctx.artifact(DATA), "--test-split", str(p.test_split)]
    )
    args = ["--model", ctx.artifact(p.model), *test, "--n", str(p.n), *_opt("--limit", p.limit)]
    args += _opt("--temperature", p.temperature) + _opt("--top-k", p.top_k) + _opt("--seed", p.seed)
    argv = crystallm("benchmark", p.task, *args, "--out", str(ctx.samples_dir), *_shard(p), *_smoke(ctx))
    return Command([argv], outputs=[ctx.rel(ctx.samples_dir)])


# --- evaluate --------------------------------------------------------------------------------


class EvaluateParams(Spec):
    inputs: list[ExperimentPath] = Field(min_length=1)
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    shard: ShardSpec | None = None


EVALUATION = "evaluation.jsonl"


def _build_evaluate(p: EvaluateParams, ctx: StageContext) -> Command:
    args = [ctx.artifact(x) for x in p.inputs] + ["--json", "--out", str(ctx.artifacts_dir / EVALUATION)]
    argv = crystallm("evaluate", *args, *_opt("--workers", p.workers), *_shard(p), *_smoke(ctx))
    return Command([argv], outputs=[ctx.rel(ctx.artifacts_dir)])


# --- merge -----------------------------------------------------------------------------------


class MergeParams(Spec):
    """The merge stage of a sharded stage (the plan's ``shards`` makes it): ``of`` is the ``crystallm merge``
    kind of the parts, ``parts`` the shard stages in order."""

    of: Literal["sample", "csp", "evaluate"]
    parts: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]] = Field(
        min_length=1, max_length=MAX_SHARDS
    )


def _build_merge(p: MergeParams, ctx: StageContext) -> Command:
    """Joins the parts' outputs into this stage's own folder, where the unsharded stage writes. Every stage's
    samples (artifacts) folder sits beside the others' in the experiment record, so a part's is a sibling."""
    if p.of == "evaluate":
        parts = [str(ctx.artifacts_dir.parent / part / EVALUATION) for part in p.parts]
        out, folder = ctx.artifacts_dir / EVALUATION, ctx.artifacts_dir
    else:
        parts = [str(ctx.samples_dir.parent / part) for part in p.parts]
        out = folder = ctx.samples_dir
    return Command([crystallm("merge", p.of, *parts, "--out", str(out))], outputs=[ctx.rel(folder)])


# --- analyze and plot ------------------------------------------------------------------------


class AnalyzeParams(Spec):
    probe: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    pairs: Literal["top-n", "all"] | None = None
    top_n: int | None = Field(None, ge=1, le=MAX_COUNT)
    tau: int | None = Field(None, ge=1, le=MAX_COUNT)
    redundancy: Literal["MMI", "CCS"] | None = None


def _build_analyze(p: AnalyzeParams, ctx: StageContext) -> Command:
    """ΦID of the experiment's probe captures (probes/) into plots/<probe>/; omegaid is the node extra ``oid``."""
    args = _opt("--probe", p.probe) + _opt("--pairs", p.pairs) + _opt("--top-n", p.top_n) + _opt("--tau", p.tau)
    args += _opt("--redundancy", p.redundancy)
    return Command([crystallm("probes", "analyze", str(ctx.experiment_dir), *args, *_smoke(ctx))])


class PlotParams(Spec):
    pass


def _build_plot(p: PlotParams, ctx: StageContext) -> Command:
    """Training curves of every metrics/*.jsonl into plots/ (the verb has no smoke mode: it is cheap)."""
    return Command([crystallm("plot", str(ctx.experiment_dir))])


GPU_STAGE = Resources(gpus=1, cpus=2, memory_mib=8192)
CPU_STAGE = Resources(gpus=0, cpus=1, memory_mib=2048)
BUILTIN_KINDS: dict[str, StageKind] = {
    "prepare": StageKind(
        PrepareParams,
        _build_prepare,
        CPU_STAGE,
        ("prepare", "demo-data"),
        ("inputs",),
        description="raw structures (or the demo set) -> data set",
        owns=(DATA,),
    ),
    "train": StageKind(
        TrainParams,
        _build_train,
        Resources(1, 4, 16384),
        ("train",),
        ("config",),
        description="train a model",
        owns=(CKPTS, PROBES),
        processes=True,
    ),
    "sample": StageKind(
        SampleParams,
        _build_sample,
        GPU_STAGE,
        ("sample",),
        ("prompts",),
        description="sample CIFs from a model",
        merge="sample",
    ),
    "mcts": StageKind(
        MctsParams, _build_mcts, GPU_STAGE, ("mcts",), extras=_mcts_extras, description="MCTS-guided generation"
    ),
    "benchmark": StageKind(
        BenchmarkParams,
        _build_benchmark,
        GPU_STAGE,
        ("benchmark",),
        ("test",),
        description="benchmark a model",
        merge="csp",
    ),
    "evaluate": StageKind(
        EvaluateParams, _build_evaluate, CPU_STAGE, ("evaluate",), description="validity of CIFs", merge="evaluate"
    ),
    "merge": StageKind(
        MergeParams, _build_merge, CPU_STAGE, ("merge",), description="join the parts of a sharded stage"
    ),
    "analyze": StageKind(
        AnalyzeParams,
        _build_analyze,
        Resources(0, 1, 4096),
        ("probes",),
        extras=lambda p: {"oid"},
        description="ΦID analysis of the probe captures (omegaid)",
    ),
    "plot": StageKind(PlotParams, _build_plot, CPU_STAGE, ("plot",), description="training curves as PNGs"),
}
for _name, _kind in BUILTIN_KINDS.items():
    register_stage(_name, _kind)
