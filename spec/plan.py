"""Experiment plans: JSON, validated on submit with every problem named by its field path.

A plan is ``{name, priority, resources, retries, smoke, shared_workdir, stages: [...]}``; each stage is
``{name, kind, params, after, resources, retries, max_retries, shards}``. :func:`validate_plan` reports all
problems at once (``stages[2].after[0]: unknown stage 'trian'``), never the first only.

One name rule (:data:`NAME_RE`) for the plan's and its stages' names. Stage names become file names in the
experiment record (``logs/<stage>.log``, ``work/<stage>/``, ...), always nested under a folder, so none is
reserved; the node checks them again with the layout's path-component rule before it makes a folder.

Size limits are checked on the raw JSON before any model sees it (a plan comes from the network):
the text, the nesting depth, the number of values, the length of each string and key, the number of
stages. Large inputs (a structure file, a data set) belong in files named by path, not in a plan.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError

from infra.spec.stages import MAX_SHARDS, Resources, Spec, get_stage_kind, stage_kinds, world_size

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_PLAN_BYTES = 16 << 20  # below the gRPC message limit, so that the field at fault can be named
MAX_DEPTH = 32
MAX_VALUES = 100_000
MAX_STRING = 64 << 10
MAX_KEY = 256
MAX_STAGES = 1000
MAX_LIMIT_ISSUES = 20
# Numbers of a plan have bounds that fit their wire and database types (docs/CONTROL_PLANE.md, Plans).
INT32_MAX = 2**31 - 1
MAX_PRIORITY = INT32_MAX  # experiments.priority is an INTEGER column, ExperimentStatus.priority an int32
MAX_GPUS = 1024
MAX_PROCESSES = 1024
MAX_NODES = 64  # members of one gang (a multi-node stage)
MAX_CPUS = 65536.0
MAX_MEMORY_MIB = 2**32 - 1  # Resources.memory_mib is a uint32 of MiB (4 PiB)
MAX_INT_DIGITS = 40  # longer integer literals are refused while parsing (Python limits int() to 4300 digits)
_UNITS = {"kib": 1 / 1024, "mib": 1, "gib": 1024, "tib": 1024 * 1024}
_MEM_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]iB)\s*$", re.IGNORECASE)


def parse_memory(value: object) -> int:
    """``"4GiB"``, ``"512MiB"`` or a whole number of MiB -> MiB."""
    if isinstance(value, bool):
        raise ValueError('memory must be a size like "4GiB" or "512MiB", or a whole number of MiB')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("memory must not be negative")
        return _memory_bound(value, value)
    if isinstance(value, str) and (m := _MEM_RE.match(value)):
        mib = float(m.group(1)) * _UNITS[m.group(2).lower()]
        return _memory_bound(int(round(mib)) if math.isfinite(mib) else math.inf, value)
    raise ValueError(f'invalid memory size {value!r}; use e.g. "4GiB", "512MiB" or a whole number of MiB')


def parse_bytes(value: str) -> int:
    """``"64GiB"``, ``"512KiB"`` or a whole number of bytes -> bytes (a command-line size named in bytes)."""
    if value.strip().isdigit():
        return int(value)
    if (m := _MEM_RE.match(value)) and math.isfinite(size := float(m.group(1)) * _UNITS[m.group(2).lower()]):
        return int(size * (1 << 20))
    raise ValueError(f'invalid size {value!r}; use e.g. "64GiB", "512MiB" or a whole number of bytes')


def _memory_bound(mib: float, given: object) -> int:
    if mib > MAX_MEMORY_MIB:
        raise ValueError(f"memory {given!r} exceeds the limit of {MAX_MEMORY_MIB} MiB (4 PiB)")
    return int(mib)


def _name(value: str) -> str:
    if not NAME_RE.match(value):
        raise ValueError(f"{value!r} is not a valid name (1-64 of letters, digits, '_', '.', '-'; starting alnum)")
    return value


def _stage_name(value: str) -> str:
    """Stage names follow the plan's one name rule; each stage's folders nest under logs/, work/, samples/ ...
    of the experiment record, so no name is reserved."""
    return _name(value)


Name = Annotated[str, BeforeValidator(lambda v: _name(v) if isinstance(v, str) else v)]
StageName = Annotated[str, BeforeValidator(lambda v: _stage_name(v) if isinstance(v, str) else v)]
Memory = Annotated[int, BeforeValidator(parse_memory)]


class ResourcesSpec(Spec):
    gpus: int | None = Field(None, ge=0, le=MAX_GPUS)
    cpus: float | None = Field(None, gt=0, le=MAX_CPUS)
    memory: Memory | None = None
    processes: int | None = Field(None, ge=1, le=MAX_PROCESSES)  # CPU processes of a multi-process kind (train)
    nodes: int | None = Field(None, ge=1, le=MAX_NODES)  # machines of a gang, each with all of the above (train)


# Why an attempt ended badly (the master records one per attempt); each class but ``cancelled`` has its
# own retry budget, so that a machine fault is never charged to the stage's own code (``error``).
RETRY_CLASSES = ("node_lost", "preempted", "infra", "error")
DEFAULT_RETRIES = {"node_lost": 3, "preempted": 3, "infra": 2, "error": 0}
Budget = Annotated[int, Field(ge=0, le=100, strict=True)]


class RetriesSpec(Spec):
    """Retry budget per failure class (``cancelled`` is never retried)."""

    node_lost: Budget | None = None
    preempted: Budget | None = None
    infra: Budget | None = None
    error: Budget | None = None


class StageSpec(Spec):
    name: StageName
    kind: str
    params: dict[str, Any] = {}
    after: list[str] = []
    resources: ResourcesSpec | None = None
    max_retries: int | None = Field(None, ge=0, le=100)  # the `error` budget (kept for older plans)
    retries: RetriesSpec | None = None
    shards: int | None = Field(None, ge=1, le=MAX_SHARDS)  # parts run as stages of their own (_expand_shards)


class PlanHeader(Spec):
    name: Name
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    resources: ResourcesSpec | None = None
    retries: RetriesSpec | None = None  # the default of every stage
    smoke: bool = False
    shared_workdir: bool = False
    stages: list[Any] = Field(min_length=1)


@dataclass(frozen=True)
class Issue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PlanError(ValueError):
    """All problems of a plan, each with its field path."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("invalid plan:\n" + "\n".join(f"  {i}" for i in issues))


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    params: dict[str, Any]  # normalised when the kind is known here, as given otherwise
    after: tuple[str, ...]
    resources: Resources
    max_retries: int  # the `error` budget, == retries["error"]
    retries: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_RETRIES))


@dataclass(frozen=True)
class Plan:
    name: str
    priority: int
    smoke: bool
    shared_workdir: bool
    stages: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "priority": self.priority,
            "smoke": self.smoke,
            "shared_workdir": self.shared_workdir,
            "stages": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "params": s.params,
                    "after": list(s.after),
                    "resources": {
                        "gpus": s.resources.gpus,
                        "cpus": s.resources.cpus,
                        "memory": s.resources.memory_mib,
                        "processes": s.resources.processes,
                        "nodes": s.resources.nodes,
                    },
                    "max_retries": s.max_retries,
                    "retries": dict(s.retries),
                }
                for s in self.stages
            ],
        }

    def order(self) -> list[Stage]:
        """Stages in a dependency order (plan order among independent stages)."""
        done: set[str] = set()
        out: list[Stage] = []
        pending = list(self.stages)
        while pending:
            stage = next(s for s in pending if done.issuperset(s.after))
            pending.remove(stage)
            done.add(stage.name)
            out.append(stage)
        return out


def field_path(loc: Iterable[str | int], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


_MESSAGES = {"missing": "missing required field", "extra_forbidden": "unknown field (not allowed here)"}


def validation_issues(err: ValidationError, prefix: str = "") -> list[Issue]:
    out = []
    for e in err.errors(include_url=False):
        msg = _MESSAGES.get(e["type"]) or e["msg"].removeprefix("Value error, ")
        out.append(Issue(field_path(e["loc"], prefix), msg))
    return out


def _merge(kind_default: Resources, *layers: ResourcesSpec | None) -> Resources:
    gpus, cpus, mem = kind_default.gpus, kind_default.cpus, kind_default.memory_mib
    procs, nodes = kind_default.processes, kind_default.nodes
    for layer in layers:
        if layer is not None:
            gpus = layer.gpus if layer.gpus is not None else gpus
            cpus = layer.cpus if layer.cpus is not None else cpus
            mem = layer.memory if layer.memory is not None else mem
            procs = layer.processes if layer.processes is not None else procs
            nodes = layer.nodes if layer.nodes is not None else nodes
    return Resources(gpus, float(cpus), mem, procs, nodes)


def _resources(
    s: StageSpec, default: ResourcesSpec | None, smoke: bool, local: bool, i: int, issues: list[Issue]
) -> Resources:
    """The stage's resources: the kind's, then the plan's, then its own. ``processes`` > 1 is for kinds that
    run several processes (``StageKind.processes``: train): given on the stage of another kind it is an
    error; the plan's default reaches only such kinds (the others run one process). With GPUs, a stage runs
    one process per GPU, so ``processes`` > 1 needs ``gpus`` 0 (CPU processes) or the same number. ``nodes``
    > 1 (a gang) follows the same rule as ``processes`` > 1: only for such kinds.

    A smoke plan is checked as the real run would be, then asks for no GPU: a smoke run rehearses the code
    path with tiny limits on any machine, so this one place drops the GPUs and every placement (the master's
    scheduler, infra-train's local check) sees gpus 0. A stage of several GPUs keeps its world size as CPU
    processes, and a gang its nodes, so the distributed path is rehearsed too."""
    kind = get_stage_kind(s.kind) if local else None
    r = _merge(kind.resources if kind is not None else Resources(), default, s.resources)
    own = s.resources.processes if s.resources is not None else None
    path = f"stages[{i}].resources.processes" if own is not None else "resources.processes"
    if kind is not None and not kind.processes:
        if own is not None and own > 1:
            issues.append(Issue(path, f"kind {s.kind!r} runs one process; only train runs several"))
        own_nodes = s.resources.nodes if s.resources is not None else None
        if own_nodes is not None and own_nodes > 1:
            issues.append(
                Issue(f"stages[{i}].resources.nodes", f"kind {s.kind!r} runs on one node; only train runs on several")
            )
        r = Resources(r.gpus, r.cpus, r.memory_mib, 1, 1)
    elif r.processes > 1 and r.gpus not in (0, r.processes):
        issues.append(
            Issue(
                path,
                f"{r.processes} processes with {r.gpus} GPU(s): a stage runs one process per GPU; give gpus 0 "
                f"(CPU processes) or gpus {r.processes}",
            )
        )
    return Resources(0, r.cpus, r.memory_mib, world_size(r), r.nodes) if smoke else r


def _accum_issue(stage: Stage, smoke: bool, i: int) -> Issue | None:
    """A train stage's ``grad_accum`` override must be a multiple of its world size (crystallm_core refuses
    anything else); one set in a config file is the stage's own check. Smoke runs set one per rank."""
    accum = stage.params.get("overrides", {}).get("grad_accum") if stage.kind == "train" else None
    n = world_size(stage.resources) * stage.resources.nodes
    if smoke or n <= 1 or not isinstance(accum, int) or isinstance(accum, bool) or accum % n == 0:
        return None
    where = f" on {stage.resources.nodes} nodes" if stage.resources.nodes > 1 else ""
    return Issue(
        f"stages[{i}].params.overrides.grad_accum",
        f"grad_accum {accum} counts micro-batches over all {n} processes{where} and must be a multiple of {n}",
    )


def _gang_issue(stage: Stage, shared_workdir: bool, i: int) -> Issue | None:
    """A gang's members run on several machines that must all see one experiment directory (rank 0 writes
    the checkpoints the others resume from): a multi-node stage needs the plan's ``shared_workdir``."""
    k = stage.resources.nodes
    if k <= 1 or shared_workdir:
        return None
    return Issue(
        "shared_workdir",
        f"stage {stage.name!r} runs on {k} nodes (stages[{i}].resources.nodes), whose members must all see one "
        "experiment directory: set shared_workdir: true (and give the nodes one shared workdir)",
    )


def shard_name(stage: str, index: int, count: int) -> str:
    """The name of part ``index`` of a stage sharded ``count`` ways."""
    return f"{stage}.shard-{index}-of-{count}"


def _expand_shards(stages: list[Stage], shards: dict[str, tuple[int, int]], issues: list[Issue]) -> list[Stage]:
    """A stage with ``shards`` S > 1 becomes S stages ``NAME.shard-I-of-S`` (same kind, params, ``after``,
    resources and retries; params ``shard`` {index, count}) and a ``merge`` stage named NAME after all of
    them, which writes the one result where the stage itself would; so ``after: [NAME]`` waits for the
    whole. Each part is scheduled, retried and placed on its own. Done here, in the contract layer, so that
    master, node and ``infra-train`` see the same stages (a validated plan validates again to itself)."""
    taken = {s.name for s in stages}
    out: list[Stage] = []
    for s in stages:
        if s.name not in shards:
            out.append(s)
            continue
        i, count = shards[s.name]
        kind = get_stage_kind(s.kind) if s.kind in stage_kinds() else None
        if kind is None or kind.merge is None:
            able = ", ".join(k for k in stage_kinds() if get_stage_kind(k).merge is not None)
            issues.append(Issue(f"stages[{i}].shards", f"kind {s.kind!r} cannot be sharded; kinds that can: {able}"))
            continue
        if count == 1:
            out.append(s)
            continue
        if s.params.get("shard") is not None:
            issues.append(Issue(f"stages[{i}].params.shard", "set by the stage's shards; give one of them"))
            continue
        names = [shard_name(s.name, k, count) for k in range(count)]
        bad = [n for n in names if not NAME_RE.match(n) or n in taken]
        if bad:
            why = "is the name of another stage" if bad[0] in taken else "is longer than names may be (64 characters)"
            issues.append(Issue(f"stages[{i}].shards", f"part name {bad[0]!r} {why}; rename the stage"))
            continue
        for k, name in enumerate(names):
            out.append(Stage(name, s.kind, {**s.params, "shard": {"index": k, "count": count}}, s.after,
                             s.resources, s.max_retries, dict(s.retries)))  # fmt: skip
        r = _merge(get_stage_kind("merge").resources)  # the merge runs on a CPU, whatever its parts need
        out.append(
            Stage(s.name, "merge", {"of": kind.merge, "parts": names}, tuple(names), r, s.max_retries, dict(s.retries))
        )
    return out


def _cycles(deps: dict[str, list[str]]) -> list[list[str]]:
    """Each dependency cycle once, as the list of names along it."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, []):
            if state.get(d) == 1:
                found.append(stack[stack.index(d) :] + [d])
            elif d in deps and d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in deps:
        if n not in state:
            visit(n)
    return found


def _check_kind(raw: dict[str, Any], i: int, accepted: set[str], local: set[str], issues: list[Issue]) -> dict | None:
    """The stage's params, normalised by its kind when the kind is known here; None on a problem."""
    kind, params = raw.get("kind"), raw.get("params", {})
    if not isinstance(kind, str) or not isinstance(params, dict):
        return None  # reported by the stage model
    if kind not in accepted:
        issues.append(Issue(f"stages[{i}].kind", f"unknown stage kind {kind!r}; known: {', '.join(sorted(accepted))}"))
        return None
    if kind not in local:
        return dict(params)
    try:
        return get_stage_kind(kind).params.model_validate(params).model_dump(mode="json", exclude_unset=True)
    except ValidationError as e:
        issues += validation_issues(e, f"stages[{i}].params")
        return None


def _shared_outputs(stages: list[Stage], index: dict[str, int]) -> list[Issue]:
    """Two stages writing the same experiment-wide folder (two ``train`` stages: ``ckpts/``) would overwrite
    each other's products; an experiment holds one of each."""
    issues = []
    owner: dict[str, Stage] = {}
    for s in stages:
        if s.kind not in stage_kinds():
            continue
        taken = [(folder, owner[folder]) for folder in get_stage_kind(s.kind).owns if folder in owner]
        if taken:
            first = taken[0][1]
            issues.append(
                Issue(
                    f"stages[{index[s.name]}].kind",
                    f"stage {s.name!r} would write {', '.join(f + '/' for f, _ in taken)} of the experiment, as "
                    f"stage {first.name!r} (stages[{index[first.name]}]) does; an experiment holds one {s.kind!r} "
                    "stage (split the work into two experiments)",
                )
            )
        for folder in get_stage_kind(s.kind).owns:
            owner.setdefault(folder, s)
    return issues


def with_defaults(plan: dict[str, Any]) -> dict[str, Any]:
    """A normalised plan (:meth:`Plan.to_dict`) with the defaults of every stage's params filled in, as the
    experiment record's plan.json keeps it; params of kinds unknown here (or that no longer validate) stay
    as given."""
    out = dict(plan)
    out["stages"] = []
    for raw in plan.get("stages", []):
        kind, params = raw.get("kind"), raw.get("params", {})
        if kind in stage_kinds():
            with contextlib.suppress(ValidationError):
                params = get_stage_kind(kind).params.model_validate(params).model_dump(mode="json")
        out["stages"].append({**raw, "params": params})
    return out


def stage_nodes(plan: Any) -> dict[str, int]:
    """Each stage's ``resources.nodes`` in a stored normalised plan, read as :func:`stage_processes` is (no
    column of its own); a plan stored before the field existed gives none: every stage runs on one node."""
    try:
        return {s["name"]: int(s.get("resources", {}).get("nodes", 1)) for s in plan.get("stages", [])}
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}


def stage_processes(plan: Any) -> dict[str, int]:
    """Each stage's ``resources.processes`` in a stored normalised plan (``Plan.to_dict``). It has no database
    column of its own (it only travels to the node), so the master reads it here; a plan stored before the
    field existed, or one that is not readable, gives none: every stage then runs one process."""
    try:
        return {s["name"]: int(s.get("resources", {}).get("processes", 1)) for s in plan.get("stages", [])}
    except (AttributeError, KeyError, TypeError, ValueError):
        return {}


def limit_issues(data: Any) -> list[Issue]:
    """Problems of size and shape, found without recursion (a hostile plan may nest thousands deep)."""
    issues: list[Issue] = []
    count = 0
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack and len(issues) < MAX_LIMIT_ISSUES:
        value, path, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            issues.append(Issue(path, f"the plan has more than {MAX_VALUES} values; the limit is {MAX_VALUES}"))
            break
        if isinstance(value, str) and len(value) > MAX_STRING:
            issues.append(
                Issue(
                    path,
                    f"string of {len(value)} characters exceeds the {MAX_STRING} limit for a plan value; "
                    "put large inputs in a file and give its path",
                )
            )
        elif isinstance(value, str):
            if problem := _text_problem(value):
                issues.append(Issue(path, f"string {problem}"))
        elif isinstance(value, _NotANumber):
            issues.append(Issue(path, f"{value.text} is not a number JSON allows; give a finite number"))
        elif isinstance(value, _LongInt):
            digits = len(value.text.lstrip("-"))
            issues.append(Issue(path, f"integer of {digits} digits is far out of range"))
        elif isinstance(value, float) and not math.isfinite(value):
            issues.append(Issue(path, f"number {value} is out of range; give a finite number"))
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                issues.append(Issue(path, f"nested deeper than {MAX_DEPTH} levels"))
                continue
            if isinstance(value, list):
                if path == "stages" and len(value) > MAX_STAGES:
                    issues.append(Issue(path, f"{len(value)} stages; the limit is {MAX_STAGES}"))
                    continue
                stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
            else:
                for k in getattr(value, "duplicates", ()):
                    issues.append(
                        Issue(
                            f"{path}.{k}" if path else k,
                            f"duplicate key {k!r}: an object may give a key once (JSON readers would keep "
                            "only one of its values)",
                        )
                    )
                for k, v in value.items():
                    if len(k) > MAX_KEY:
                        issues.append(Issue(path, f"a key of {len(k)} characters exceeds the {MAX_KEY} limit"))
                        continue
                    if problem := _text_problem(k):
                        issues.append(Issue(path, f"key {k!r} {problem}"))
                        continue
                    stack.append((v, f"{path}.{k}" if path else k, depth + 1))
    return issues


def _text_problem(text: str) -> str | None:
    """What makes a string unfit to store and pass on (a NUL ends C strings and argv; PostgreSQL text refuses
    it; a lone surrogate is not Unicode and cannot be encoded as UTF-8)."""
    if "\x00" in text:
        return f"contains a NUL character (at {text.index(chr(0))})"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode: a lone surrogate {text[e.start]!a} at character {e.start}"
    return None


def _retries(s: StageSpec, default: RetriesSpec | None, i: int, issues: list[Issue]) -> dict[str, int]:
    """The stage's budget per class: its own ``retries``, else the plan's, else :data:`DEFAULT_RETRIES`;
    ``max_retries`` is the ``error`` budget (giving both, they must agree)."""
    out = dict(DEFAULT_RETRIES)
    for spec in (default, s.retries):
        if spec is not None:
            out.update({k: v for k, v in spec.model_dump().items() if v is not None})
    if s.max_retries is not None:
        own = s.retries.error if s.retries is not None else None
        if own is not None and own != s.max_retries:
            issues.append(
                Issue(
                    f"stages[{i}].max_retries",
                    f"max_retries {s.max_retries} disagrees with retries.error {own}; give one of them",
                )
            )
        out["error"] = s.max_retries
    return out


def validate_plan(data: Any, known_kinds: Iterable[str] | None = None) -> Plan:
    """Validate a parsed plan. ``known_kinds`` beyond the kinds registered here are accepted with
    their params unchecked (plugin kinds that only nodes know; the node validates them)."""
    if not isinstance(data, dict):
        raise PlanError([Issue("", "a plan must be a JSON object")])
    limits = limit_issues(data)
    if limits:
        raise PlanError(sorted(limits, key=lambda i: i.path))
    issues: list[Issue] = []
    try:
        header = PlanHeader.model_validate(data)
    except ValidationError as e:
        issues += validation_issues(e)
        header = None
    local = set(stage_kinds())
    accepted = local | set(known_kinds or ())
    raw_stages = data.get("stages") if isinstance(data.get("stages"), list) else []
    specs: list[tuple[int, StageSpec]] = []
    for i, raw in enumerate(raw_stages):
        try:
            specs.append((i, StageSpec.model_validate(raw)))
        except ValidationError as e:
            issues += validation_issues(e, f"stages[{i}]")

    first_index: dict[str, int] = {}
    for i, s in specs:
        if s.name in first_index:
            issues.append(
                Issue(f"stages[{i}].name", f"duplicate stage name {s.name!r} (also stages[{first_index[s.name]}])")
            )
        else:
            first_index[s.name] = i
    spec_at = dict(specs)
    raw_index: dict[str, int] = {}
    for i, r in enumerate(raw_stages):
        if isinstance(r, dict) and isinstance(r.get("name"), str):
            raw_index.setdefault(r["name"], i)
    names = set(raw_index)
    deps: dict[str, list[str]] = {}
    stages: list[Stage] = []
    shards: dict[str, tuple[int, int]] = {}  # stage name -> (its index, shards) where given
    for i, raw in enumerate(raw_stages):  # a stage with errors elsewhere still gets these checks
        if not isinstance(raw, dict):
            continue
        name = raw.get("name")
        after = [d for d in raw.get("after", []) if isinstance(d, str)] if isinstance(raw.get("after"), list) else []
        for j, dep in enumerate(after):
            if dep == name:
                issues.append(Issue(f"stages[{i}].after[{j}]", f"stage {name!r} cannot depend on itself"))
            elif dep not in names:
                issues.append(Issue(f"stages[{i}].after[{j}]", f"unknown stage {dep!r}"))
        if isinstance(name, str):
            deps.setdefault(name, [d for d in after if d in names and d != name])
        params = _check_kind(raw, i, accepted, local, issues)
        s = spec_at.get(i)
        if s is None or params is None:
            continue
        smoke = header is not None and header.smoke
        resources = _resources(s, header.resources if header is not None else None, smoke, s.kind in local, i, issues)
        retries = _retries(s, header.retries if header is not None else None, i, issues)
        stages.append(Stage(s.name, s.kind, params, tuple(s.after), resources, retries["error"], retries))
        if s.shards is not None:
            shards[s.name] = (i, s.shards)
        if accum := _accum_issue(stages[-1], smoke, i):
            issues.append(accum)
        if gang := _gang_issue(stages[-1], header is not None and header.shared_workdir, i):
            issues.append(gang)
    issues += _shared_outputs(stages, raw_index)
    stages = _expand_shards(stages, shards, issues)
    for cycle in _cycles(deps):
        issues.append(Issue(f"stages[{raw_index[cycle[0]]}].after", "dependency cycle: " + " -> ".join(cycle)))
    issues.sort(key=lambda x: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", x.path)])
    if issues or header is None:
        raise PlanError(issues)
    return Plan(header.name, header.priority, header.smoke, header.shared_workdir, tuple(stages))


class _NotANumber:
    """``NaN``, ``Infinity`` or ``-Infinity`` in a plan's text: Python's json accepts them, JSON does not."""

    def __init__(self, text: str) -> None:
        self.text = text


class _LongInt:
    """An integer literal of more than :data:`MAX_INT_DIGITS` digits, kept as text (never converted)."""

    def __init__(self, text: str) -> None:
        self.text = text


class _Duplicates(dict):
    """A JSON object that gives a key more than once (``duplicates``); :func:`limit_issues` names them."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    duplicates: list[str] = []
    for k, v in pairs:
        if k in out and k not in duplicates:
            duplicates.append(k)
        out[k] = v
    if not duplicates:
        return out
    marked = _Duplicates(out)
    marked.duplicates = duplicates
    return marked


def _int(text: str) -> int | _LongInt:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else _LongInt(text)


_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_NotANumber, parse_int=_int)


def parse_plan_text(text: str, source: str = "plan") -> Any:
    """A plan's JSON text, parsed strictly: besides invalid JSON, duplicate keys, ``NaN``/``Infinity``,
    numbers beyond range and strings that are not storable text are refused, each with its field path
    (with the size limits of :func:`limit_issues`)."""
    if len(text) > MAX_PLAN_BYTES:
        raise PlanError(
            [Issue(source, f"plan is {len(text) / 2**20:.1f} MiB; the limit is {MAX_PLAN_BYTES >> 20} MiB")]
        )
    try:
        data = _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise PlanError([Issue(f"{source} line {e.lineno} column {e.colno}", f"invalid JSON: {e.msg}")]) from None
    except RecursionError:
        raise PlanError([Issue(source, f"nested far deeper than the {MAX_DEPTH} levels a plan may have")]) from None
    issues = limit_issues(data)
    if issues:
        raise PlanError(sorted(issues, key=lambda i: i.path))
    return data


def decode_plan_bytes(raw: bytes, source: str) -> str:
    """A plan file's bytes as text: UTF-8 (a byte-order mark is dropped); anything else is a named error."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise PlanError(
            [
                Issue(
                    source,
                    f"not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} ({e.reason}); "
                    "save the plan as UTF-8",
                )
            ]
        ) from None


def load_plan_data(path: str | Path) -> Any:
    """The parsed JSON of a plan file (not yet validated)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PlanError([Issue(str(p), f"cannot read plan: {e.strerror}")]) from None
    if len(raw) > 4 * MAX_PLAN_BYTES:  # the text limit, checked on the text too; a huge file is not decoded
        raise PlanError([Issue(str(p), f"plan is {len(raw) / 2**20:.1f} MiB; the limit is {MAX_PLAN_BYTES >> 20} MiB")])
    return parse_plan_text(decode_plan_bytes(raw, str(p)), str(p))


def force_smoke(data: Any) -> Any:
    """The parsed plan with ``smoke`` on: ``--smoke`` of ``infra-train`` and ``infra submit`` overrides the
    plan's own flag. Anything but an object is returned as it is, for validation to name."""
    return {**data, "smoke": True} if isinstance(data, dict) else data


def resolve_inputs(data: Any, base: Path) -> Any:
    """Make the relative external input paths of known kinds (e.g. prepare ``inputs``) absolute
    against ``base``; the client does this before submitting, since nodes have no notion of its cwd."""
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        return data
    out = dict(data)
    out["stages"] = []
    for raw in data["stages"]:
        if isinstance(raw, dict) and raw.get("kind") in stage_kinds() and isinstance(raw.get("params"), dict):
            params = dict(raw["params"])
            for key in get_stage_kind(raw["kind"]).input_fields:
                if key in params:
                    params[key] = _absolute(params[key], base)
            raw = {**raw, "params": params}
        out["stages"].append(raw)
    return out


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str((base / value).resolve())
    if isinstance(value, str) and value.startswith("~"):
        return str(Path(value).expanduser())
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    return value
