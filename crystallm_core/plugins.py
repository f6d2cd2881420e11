"""Plugins: scorers, vocabularies, model sizes and metrics added without forking the package.

Two sources, loaded in this order:

* **Entry points** of the group ``crystallm.plugins`` in installed distributions. Each names a module
  (imported) or a callable (called with no arguments); either registers through the public
  registries. The distribution that installs this package ships its scorers this way.
* **Workdir files**: ``<workdir>/plugins/<kind>/*.py`` with kind one of ``scorer``, ``vocab``,
  ``model``, ``metrics``. Each file is imported as ``infra_ext.<kind>.<stem>``; the
  ``infra_ext`` package and its kind packages are created in ``sys.modules`` at load time with the
  kind folders as their ``__path__``, so plugins of one folder may import each other by those names.
  Other folders named in :data:`ELSEWHERE` belong to other loaders and are skipped here.

The same isolated loading serves callers with registries of their own: :func:`load_modules` imports
modules or ``.py`` files after the same probe (a node's stage kinds, ``<workdir>/plugins/stage/``).

Untrusted code must not wedge the process that loads it: a plugin that raises, exits or hangs is
reported (path and error) and skipped while the others load. So every workdir file and every
entry point of another distribution is first imported in a child interpreter (one child for all,
reporting each import as it starts and ends; a child that exceeds the time limit on one plugin is
killed and a fresh one continues with the rest), and only the ones that imported cleanly there are
imported here. A thread cannot give this guarantee: a hung import cannot be killed and keeps its
module's import lock. Entry points of the distribution that installed this package are imported directly (no child).

What each plugin registered is found by comparing the registries before and after its import;
:meth:`PluginReport.registered` lists every registered name with its source: ``built-in``,
``entry point NAME (DIST)`` or the plugin's file path. See docs/PLUGINS.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from importlib import machinery, metadata
from pathlib import Path
from typing import Any

KINDS = ("scorer", "vocab", "model", "metrics")
ELSEWHERE = ("stage",)  # workdir plugin folders that another loader reads (a node's stage kinds: load_modules)
NAMESPACE = "infra_ext"
ENTRY_POINT_GROUP = "crystallm.plugins"
DEFAULT_TIMEOUT = 30.0  # seconds per plugin import: the one default of every loader (crystallm, node, infra-train)
TIMEOUT_ENV = "INFRA_PLUGIN_TIMEOUT"
WORKDIR_ENV = "INFRA_WKDIR"
_HUNG = "import did not finish within"
STARTUP_SECONDS = 60.0  # for the child interpreter to start, before any plugin's time limit applies

# Registries that plugins write to: kind -> (module holding it, attribute). Only modules already
# imported are read, so listing never pays for importing torch.
REGISTRIES = {
    "scorer": ("crystallm_core.scorers", "SCORERS"),
    "vocab": ("crystallm_core.vocab", "VOCABS"),
    "model": ("crystallm_core.model", "MODELS"),
    "metric": ("crystallm_core.evaluate", "METRICS"),
}


@dataclass(frozen=True)
class Plugin:
    """A plugin that loaded, and the names it registered as ``kind:name``."""

    source: str
    module: str
    registered: tuple[str, ...]


@dataclass(frozen=True)
class Failure:
    """A plugin that did not load: its path (or entry point) and why (``hung``: it exceeded the time limit)."""

    source: str
    error: str
    hung: bool = False


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    source: str


@dataclass
class PluginReport:
    """What :func:`load_plugins` found: loaded plugins and failures (entry points included)."""

    workdir: Path | None
    loaded: list[Plugin] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def registered(self) -> list[Registered]:
        """Every name in the registries of modules imported so far, with where it came from."""
        out = []
        for kind, names in _registry_contents().items():
            for name in sorted(names):
                out.append(Registered(kind, name, _STATE.attribution.get(f"{kind}:{name}", "built-in")))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": None if self.workdir is None else str(self.workdir),
            "registered": [asdict(r) for r in self.registered()],
            "loaded": [asdict(p) for p in self.loaded],
            "failed": [asdict(f) for f in self.failed],
        }


@dataclass
class _State:
    """Per-process memory of what was loaded, so repeated calls import nothing twice."""

    entry_points_done: bool = False
    files_done: set[str] = field(default_factory=set)
    loaded: list[Plugin] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    attribution: dict[str, str] = field(default_factory=dict)  # "kind:name" -> source


_STATE = _State()
_LOCK = threading.RLock()


# ---------------------------------------------------------------- where plugins live


def resolve_workdir(explicit: str | Path | None = None) -> Path | None:
    """``explicit``, else ``$INFRA_WKDIR``, else the workdir saved by ``infra-wkdir --set``, else None."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(WORKDIR_ENV):
        return Path(os.environ[WORKDIR_ENV]).expanduser()
    return _saved_workdir()


def _saved_workdir() -> Path | None:
    """The single line of ``<config dir>/wkdir`` (the file ``infra-wkdir --set`` writes)."""
    if os.environ.get("INFRA_CONFIG_DIR"):
        config = Path(os.environ["INFRA_CONFIG_DIR"]).expanduser()
    elif os.environ.get("XDG_CONFIG_HOME"):
        config = Path(os.environ["XDG_CONFIG_HOME"]).expanduser() / "infra"
    else:
        config = Path.home() / ".config" / "infra"
    try:
        text = (config / "wkdir").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return Path(text) if text else None


def default_timeout() -> float:
    """``$INFRA_PLUGIN_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`; a bad value is an error naming the variable."""
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"${TIMEOUT_ENV} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class _Item:
    """One thing to import: a workdir file (module + path) or an entry point (name, value, distribution)."""

    source: str
    module: str = ""
    path: str = ""
    ep_name: str = ""
    ep_value: str = ""

    by_path: bool = False  # a file anywhere, imported as ``module`` from ``path`` (load_modules)

    def load(self) -> None:
        if self.ep_value:
            obj = metadata.EntryPoint(self.ep_name, self.ep_value, ENTRY_POINT_GROUP).load()
            if callable(obj) and not isinstance(obj, types.ModuleType):
                obj()
        elif self.by_path:
            _import_file(self.module, self.path)
        else:
            importlib.import_module(self.module)


def _import_file(module_name: str, path: str) -> None:
    """Import the file ``path`` as ``module_name`` (once per process)."""
    if module_name in sys.modules:
        return
    mspec = importlib.util.spec_from_file_location(module_name, path)
    if mspec is None or mspec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mspec)
    sys.modules[module_name] = module
    try:
        mspec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


def discover(workdir: Path) -> tuple[list[_Item], list[Failure]]:
    """Plugin files under ``workdir/plugins`` in load order (kind folders, then file names)."""
    root = workdir / "plugins"
    items: list[_Item] = []
    failed: list[Failure] = []
    if not root.is_dir():
        return items, failed
    for entry in sorted(root.iterdir()):
        if entry.name.startswith((".", "_")):
            continue
        if not entry.is_dir():
            if entry.suffix == ".py":
                failed.append(Failure(str(entry), f"plugin files go in a kind folder: {', '.join(KINDS)}"))
            continue
        if entry.name in ELSEWHERE:
            continue
        if entry.name not in KINDS:
            failed.append(
                Failure(str(entry), f"unknown plugin folder {entry.name!r}; expected one of {', '.join(KINDS)}")
            )
            continue
        for path in sorted(entry.glob("*.py")):
            if path.name == "__init__.py":
                continue
            if not path.stem.isidentifier():
                failed.append(Failure(str(path), "file name is not a Python identifier, so it cannot be a module"))
                continue
            items.append(_Item(source=str(path), module=f"{NAMESPACE}.{entry.name}.{path.stem}", path=str(path)))
    return items, failed


def _ensure_namespace(workdir: Path) -> None:
    """Create ``infra_ext`` and ``infra_ext.<kind>`` as packages whose path is the kind folders."""
    root = sys.modules.get(NAMESPACE)
    if root is None:
        root = types.ModuleType(NAMESPACE, "Plugins loaded from node workdirs (crystallm_core.plugins).")
        root.__path__ = []
        root.__spec__ = machinery.ModuleSpec(NAMESPACE, None, is_package=True)
        sys.modules[NAMESPACE] = root
    for kind in KINDS:
        name = f"{NAMESPACE}.{kind}"
        folder = str(workdir / "plugins" / kind)
        package = sys.modules.get(name)
        if package is None:
            package = types.ModuleType(name)
            package.__path__ = []
            package.__spec__ = machinery.ModuleSpec(name, None, is_package=True)
            sys.modules[name] = package
            setattr(root, kind, package)
        if folder not in package.__path__:
            package.__path__.append(folder)


# ---------------------------------------------------------------- attribution


def _registry_contents() -> dict[str, dict[str, object]]:
    """kind -> {name: registered object} for every registry whose module is imported."""
    out: dict[str, dict[str, object]] = {}
    for kind, (module_name, attr) in REGISTRIES.items():
        module = sys.modules.get(module_name)
        registry = getattr(module, attr, None) if module is not None else None
        if registry is not None:
            out[kind] = {e.name: e.obj for e in registry.entries()}
    return out


def _builtins_of(kind: str) -> dict[str, object]:
    """What a registry holds by itself once its module is imported (used when a plugin imported it first)."""
    module_name, attr = REGISTRIES[kind]
    return {e.name: e.obj for e in getattr(sys.modules[module_name], attr).entries() if e.source == module_name}


@contextmanager
def _attributed(source: str) -> Iterator[list[str]]:
    """Record every name registered (or replaced) inside the block as coming from ``source``."""
    before = _registry_contents()
    added: list[str] = []
    try:
        yield added
    finally:
        for kind, now in _registry_contents().items():
            old = before.get(kind)
            if old is None:
                old = _builtins_of(kind)
            for name, obj in now.items():
                if old.get(name) is not obj:
                    added.append(f"{kind}:{name}")
                    _STATE.attribution[f"{kind}:{name}"] = source


# ---------------------------------------------------------------- loading


def _describe(exc: BaseException, path: str) -> str:
    """``Type: message``, with the line of the plugin file where it was raised when there is one."""
    text = f"{type(exc).__name__}: {exc}"
    if path:
        lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
        if lines:
            text += f" (line {lines[-1]})"
    return text


def _import_here(item: _Item) -> None:
    with _attributed(item.source) as added:
        try:
            item.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin calling sys.exit() is a failed plugin, not an exit
            _STATE.failed.append(Failure(item.source, _describe(exc, item.path)))
            if item.module:
                sys.modules.pop(item.module, None)
            return
    _STATE.loaded.append(Plugin(item.source, item.module or item.ep_value, tuple(added)))


def _entry_point_items() -> tuple[list[_Item], list[_Item]]:
    """(entry points of the distribution that installed this package, other distributions'), sorted by name."""
    own, others = [], []
    mine = own_distributions()
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (e.name, e.value)):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        item = _Item(
            source=f"entry point {ep.name} ({dist or 'unknown distribution'})", ep_name=ep.name, ep_value=ep.value
        )
        (own if dist in mine else others).append(item)
    return own, others


def own_distributions() -> set[str]:
    """The distributions that install the package ``crystallm_core`` (trusted: their plugins are not probed)."""
    return set(metadata.packages_distributions().get(__name__.partition(".")[0], []))


def load_entry_points(timeout: float | None = None) -> None:
    """Import the ``crystallm.plugins`` entry points once per process (this package's directly, others probed)."""
    with _LOCK:
        if _STATE.entry_points_done:
            return
        _STATE.entry_points_done = True
        own, others = _entry_point_items()
        for item in own:
            _import_here(item)
        if others:
            _load_probed(others, None, timeout or default_timeout())


def _load_probed(items: list[_Item], workdir: Path | None, timeout: float) -> None:
    if not items:
        return
    verdicts = probe(items, workdir, timeout)
    for item in items:
        error = verdicts.get(item.source)
        if error is None:
            _import_here(item)
        else:
            _STATE.failed.append(_failure(item.source, error))


def _failure(source: str, error: str) -> Failure:
    return Failure(source, error, hung=error.startswith(_HUNG))


def load_modules(
    items: list[str], timeout: float | None = None, preload: tuple[str, ...] = (), prefix: str = "plugin"
) -> tuple[list[str], list[Failure]]:
    """Import plugins that register into a caller's own registries, isolated as the others are: each of
    ``items`` (an importable module name, or a ``.py`` file imported as ``<prefix>_<stem>``) is first imported
    in a child interpreter within ``timeout`` seconds, then here if that went cleanly. ``preload`` modules are
    imported in the child before any plugin (so their cost is not charged to the first one). Returns (the
    items that loaded, the failures); what failed is not imported here."""
    timeout = default_timeout() if timeout is None else timeout
    if timeout <= 0:
        raise ValueError(f"plugin time limit must be positive, got {timeout}")
    todo = []
    for item in items:
        if item.endswith(".py"):
            path = Path(item).resolve()
            todo.append(_Item(source=item, module=f"{prefix}_{path.stem}", path=str(path), by_path=True))
        else:
            todo.append(_Item(source=item, module=item))
    verdicts = probe(todo, None, timeout, preload=preload, mirror=False) if todo else {}
    loaded, failed = [], []
    for item in todo:
        error = verdicts.get(item.source)
        if error is None:
            try:
                item.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # imported cleanly in the probe, not here: still a failed plugin
                error = _describe(exc, item.path)
        if error is None:
            loaded.append(item.source)
        else:
            failed.append(_failure(item.source, error))
    return loaded, failed


def load_plugins(workdir: str | Path | None, timeout: float | None = None) -> PluginReport:
    """Load entry-point plugins and the plugin files of ``workdir`` (None: entry points only).

    Safe to call again: what was loaded stays loaded and is not imported twice. Returns a report of
    everything loaded and failed in this process so far.
    """
    timeout = default_timeout() if timeout is None else timeout
    if timeout <= 0:
        raise ValueError(f"plugin time limit must be positive, got {timeout}")
    wd = Path(workdir).expanduser().resolve() if workdir is not None else None
    with _LOCK:
        load_entry_points(timeout)
        if wd is not None:
            items, failed = discover(wd)
            fresh = [i for i in items if i.source not in _STATE.files_done]
            _STATE.failed.extend(f for f in failed if f.source not in _STATE.files_done)
            _STATE.files_done.update([i.source for i in items] + [f.source for f in failed])
            if fresh:
                _ensure_namespace(wd)
                _load_probed(fresh, wd, timeout)
        return PluginReport(wd, list(_STATE.loaded), list(_STATE.failed))


def failures_for(kind: str) -> list[Failure]:
    """Failed plugins that might have provided a ``kind`` (for 'unknown name' errors)."""
    return [f for f in _STATE.failed if f"/{kind}/" in f.source or f.source.startswith("entry point")]


# ---------------------------------------------------------------- the probe


def probe(
    items: list[_Item],
    workdir: Path | None,
    timeout: float,
    preload: tuple[str, ...] | None = None,
    mirror: bool = True,
) -> dict[str, str | None]:
    """Import ``items`` in order in child interpreters; source -> None (clean) or the error.

    The child reports ``start`` and ``done`` per item on a pipe. When one item exceeds ``timeout``
    seconds the child (and anything it started) is killed, that item fails, and a fresh child goes
    on with the items after it. ``preload``: modules the child imports first (default: this package's
    registries); ``mirror``: the child imports the trusted entry points first, as the parent has.
    """
    verdicts: dict[str, str | None] = {}
    pending = list(items)
    while pending:
        done = _probe_round(pending, workdir, timeout, verdicts, preload, mirror)
        if not done:  # the child died before reporting anything: blame every pending item
            for item in pending:
                verdicts.setdefault(item.source, "the plugin probe interpreter failed to start")
            break
        pending = [i for i in pending if i.source not in verdicts]
    return verdicts


def _probe_round(
    items: list[_Item],
    workdir: Path | None,
    timeout: float,
    verdicts: dict[str, str | None],
    preload: tuple[str, ...] | None,
    mirror: bool,
) -> int:
    """One child over ``items``; fills ``verdicts``; returns how many items got a verdict."""
    spec: dict[str, Any] = {"workdir": None if workdir is None else str(workdir), "items": [asdict(i) for i in items]}
    spec["preload"] = [m for m, _ in REGISTRIES.values()] if preload is None else list(preload)
    spec["mirror"] = mirror
    proc = subprocess.Popen(
        [sys.executable, "-c", "from crystallm_core.plugins import _probe_child; _probe_child()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # one process group: a plugin's own children die with the probe
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    decided = 0
    current: str | None = None
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if current is not None:
                    verdicts[current] = f"{_HUNG} {timeout:g} s (time limit; ${TIMEOUT_ENV})"
                    decided += 1
                return decided
            if line is None:  # the child exited
                if current is not None:
                    code = proc.wait()
                    verdicts[current] = f"import ended the interpreter (exit status {code})"
                    decided += 1
                return decided
            msg = json.loads(line)
            if msg["event"] == "start":
                current = msg["source"]
                deadline = time.monotonic() + timeout
            else:
                verdicts[msg["source"]] = msg.get("error")
                decided += 1
                current = None
                deadline = time.monotonic() + STARTUP_SECONDS
    finally:
        _kill(proc)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
    proc.wait()


def _probe_child() -> None:
    """Body of the probe interpreter: import each item, reporting on the original stdout."""
    report = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what plugins print goes to stderr (discarded), never into the report stream
    spec = json.loads(sys.stdin.read())
    for module_name in spec["preload"]:  # shared imports (torch) are not charged to the first plugin
        importlib.import_module(module_name)
    if spec["workdir"]:
        _ensure_namespace(Path(spec["workdir"]))
    own, _ = _entry_point_items() if spec["mirror"] else ([], [])
    for item in own:  # the parent has these loaded already; mirror its registries
        with suppress(Exception):
            item.load()
    for raw in spec["items"]:
        item = _Item(**raw)
        report.write(json.dumps({"event": "start", "source": item.source}) + "\n")
        error = None
        try:
            item.load()
        except BaseException as exc:
            error = _describe(exc, item.path)
        report.write(json.dumps({"event": "done", "source": item.source, "error": error}) + "\n")
    report.flush()
    os._exit(0)  # threads a plugin started must not keep the probe alive


# ---------------------------------------------------------------- the CLI hook and verb


def load_for_cli(announce: Callable[[str], None] | None = None) -> PluginReport:
    """Load plugins for a ``crystallm`` verb (workdir from $INFRA_WKDIR or infra-wkdir); failures go to stderr."""
    say = announce or (lambda text: print(text, file=sys.stderr))
    try:
        timeout = default_timeout()
    except ValueError as exc:
        say(f"crystallm: {exc}; using {DEFAULT_TIMEOUT:g} s")
        timeout = DEFAULT_TIMEOUT
    report = load_plugins(resolve_workdir(None), timeout)
    for f in report.failed:
        say(f"crystallm: plugin {f.source} skipped: {f.error}")
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="what is registered (name, kind, source) and which plugins failed")
    ls.add_argument("--json", action="store_true", help="one JSON object")
    ls.add_argument("--workdir", default=None, help="node workdir (default: $INFRA_WKDIR, else infra-wkdir's)")
    ls.add_argument(
        "--timeout", type=float, default=None, help=f"seconds per plugin import (default {DEFAULT_TIMEOUT:g})"
    )


def run(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    if args.workdir and not Path(args.workdir).expanduser().is_dir():
        print(f"crystallm plugins: error: --workdir {args.workdir} is not a directory", file=sys.stderr)
        return 2
    if args.timeout is not None and args.timeout <= 0:
        print(f"crystallm plugins: error: --timeout must be positive, got {args.timeout}", file=sys.stderr)
        return 2
    for module in ("crystallm_core.scorers", "crystallm_core.vocab", "crystallm_core.model", "crystallm_core.evaluate"):
        importlib.import_module(module)  # list built-ins too, not only what plugins happened to import
    try:
        report = load_plugins(workdir, args.timeout)
    except ValueError as exc:
        print(f"crystallm plugins: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"workdir: {report.workdir or '(none)'}")
    rows = report.registered()
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        print(f"  {r.kind:<7} {r.name:<{width}}  {r.source}")
    if report.failed:
        print("failed:")
        for f in report.failed:
            print(f"  {f.source}: {f.error}")
    return 0
