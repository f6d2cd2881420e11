"""Activation probes: module outputs captured on fixed validation windows while a model trains.

A probe names ``source_modules`` and ``target_modules`` (paths of ``model.named_modules()``, e.g.
``blocks.3.mlp``). At every ``save_every_n_evals``-th validation (and at the last one) the trainer runs
the probe's windows through the eager model with forward hooks on those modules, keeps the outputs at
the chosen token positions in the chosen dtype, and hands them to a background thread that writes
``probes/<probe>/eval_<step>.pt.gz`` while training goes on. Hooks exist only during that pass: training
steps never see them, so a run without probes is unchanged and a run with probes pays only for the
capture pass (and for waiting when a write is still in flight at the next capture).

File format (``torch.save`` of a dict, gzip-compressed, written atomically):

* ``metadata``: format, probe, step, epoch, tokens_seen, source_modules, target_modules, data_set,
  data_dir, split, vocab_id, model, context, subset_size, windows (validation CIF index of each
  window), positions, dtype, shapes (module -> [subset, positions, width]);
* ``source_activations`` / ``target_activations``: module -> tensor [subset, positions, width];
* ``labels``: int64 input token ids at the kept positions, [subset, positions].

The windows are ``subset_size`` validation windows chosen once by a seeded permutation of the
validation CIFs (each window starts at a CIF, as training windows do; CIFs repeat only when there are
fewer than ``subset_size``), so every capture of a run sees the same tokens.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crystallm_core.config import ConfigError
from crystallm_core.layout import LayoutError, check_probe_name
from crystallm_core.tokens import TokenData

FORMAT = "crystallm-probe/1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
KEYS = ("name", "source_modules", "target_modules", "save_every_n_evals", "subset_size", "positions", "dtype")
REQUIRED = ("name", "source_modules", "target_modules")
DEFAULT_SUBSET = 32
SMOKE_SUBSET = 4
COMPRESS_LEVEL = 0  # stored gzip: level 1 saves ~7 % of a capture of fp16 activations at 10x the write time
_SLICE = re.compile(r"(-?\d+)?:(-?\d+)?(?::(-?\d+)?)?")


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    source_modules: tuple[str, ...]
    target_modules: tuple[str, ...]
    save_every_n_evals: int = 1
    subset_size: int = DEFAULT_SUBSET
    positions: tuple[int | str, ...] | None = None  # None: every position of the context
    dtype: str = "float16"

    @property
    def modules(self) -> list[str]:
        """Every module of the probe once, sources first."""
        return list(dict.fromkeys(self.source_modules + self.target_modules))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source_modules": list(self.source_modules),
            "target_modules": list(self.target_modules),
            "save_every_n_evals": self.save_every_n_evals,
            "subset_size": self.subset_size,
            "positions": None if self.positions is None else list(self.positions),
            "dtype": self.dtype,
        }


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: expected a positive integer, got {value!r}")
    return value


def _modules(value: Any, where: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(m, str) and m for m in items):
        raise ValueError(f"{where}: expected a non-empty list of module names such as 'blocks.0.mlp', got {value!r}")
    return tuple(items)


def _slice(text: str) -> slice:
    m = _SLICE.fullmatch(text.replace(" ", ""))
    if not m:
        raise ValueError(f"{text!r} is neither an integer nor a 'start:stop:step' slice")
    start, stop, step = (None if g is None else int(g) for g in m.groups())
    if step == 0:
        raise ValueError(f"slice {text!r} has a step of 0")
    return slice(start, stop, step)


def _positions(value: Any, where: str) -> tuple[int | str, ...] | None:
    """None/'all' (every position), an int, a 'start:stop:step' string, or a list of those."""
    if value is None or value == "all":
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{where}: an empty list selects no position (leave it out to keep all)")
    out: list[int | str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"{where}: {item!r} is neither an integer nor a 'start:stop:step' slice")
        if isinstance(item, str) and re.fullmatch(r"\s*-?\d+\s*", item):
            item = int(item)
        elif isinstance(item, str):
            try:
                _slice(item)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
        out.append(item)
    return tuple(out)


def _parse_one(item: Any, index: int) -> ProbeSpec:
    where = f"probes[{index}]"
    if not isinstance(item, dict):
        raise ValueError(
            f"{where}: expected a mapping with keys {', '.join(REQUIRED)} (and optional ones), got {item!r}"
        )
    name = item.get("name")
    label = f"probe {name!r} ({where})" if isinstance(name, str) else where
    unknown = sorted(set(item) - set(KEYS))
    if unknown:
        raise ValueError(f"{label}: unknown key(s) {', '.join(map(str, unknown))}; valid keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in item]
    if missing:
        raise ValueError(f"{label}: missing required key(s) {', '.join(missing)}")
    try:
        check_probe_name(name)
    except LayoutError as e:
        raise ValueError(f"{label}.name: {e}") from None
    dtype = item.get("dtype", "float16")
    if dtype not in DTYPES:
        raise ValueError(f"{label}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return ProbeSpec(
        name=name,
        source_modules=_modules(item["source_modules"], f"{label}.source_modules"),
        target_modules=_modules(item["target_modules"], f"{label}.target_modules"),
        save_every_n_evals=_positive_int(item.get("save_every_n_evals", 1), f"{label}.save_every_n_evals"),
        subset_size=_positive_int(item.get("subset_size", DEFAULT_SUBSET), f"{label}.subset_size"),
        positions=_positions(item.get("positions"), f"{label}.positions"),
        dtype=dtype,
    )


def parse_probes(items: Any) -> list[ProbeSpec]:
    """The ``probes`` of a training config, checked key by key; errors name the probe and the key."""
    if not isinstance(items, list):
        raise ValueError(f"probes: expected a list of probe mappings, got {items!r}")
    specs: list[ProbeSpec] = []
    for i, item in enumerate(items):
        spec = _parse_one(item, i)
        if any(s.name == spec.name for s in specs):
            raise ValueError(f"probe {spec.name!r} (probes[{i}]): another probe has the same name")
        specs.append(spec)
    return specs


def resolve_positions(positions: tuple[int | str, ...] | None, context: int, drop_outside: bool = False) -> list[int]:
    """Sorted distinct positions of a ``context``-token window. Integers may count from the end (-1 is the
    last); slices follow Python's rules. ``drop_outside`` skips integers beyond the context (smoke runs
    use a shorter one) instead of refusing them."""
    if positions is None:
        return list(range(context))
    chosen: set[int] = set()
    for p in positions:
        if isinstance(p, int):
            if -context <= p < context:
                chosen.add(p % context)
            elif not drop_outside:
                raise ValueError(f"position {p} is outside the context of {context} tokens")
        else:
            chosen.update(range(context)[_slice(p)])
    if not chosen:
        raise ValueError(f"{list(positions)} selects no position of a {context}-token context")
    return sorted(chosen)


def subset_windows(data: TokenData, size: int, context: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``size`` windows of ``context`` input tokens, each starting at a validation CIF chosen by a seeded
    permutation (the same for every capture); returns the tokens [size, context] and the CIF indices."""
    n = len(data.starts)
    order = np.random.default_rng(seed).permutation(n)
    cifs = order[np.arange(size) % n]
    starts = np.asarray(data.starts, dtype=np.int64)[cifs]
    idx = (starts[:, None] + np.arange(context, dtype=np.int64)[None, :]) % len(data.tokens)
    return torch.from_numpy(data.tokens[idx].astype(np.int64)), [int(c) for c in cifs]


@dataclass
class Probe:
    """A probe ready to capture: its spec, its positions and its fixed windows."""

    spec: ProbeSpec
    positions: list[int]
    windows: torch.Tensor  # [subset, context] input token ids, CPU
    cifs: list[int]


class CaptureWriteError(RuntimeError):
    """A capture could not be written: the run fails rather than go on without it."""


@dataclass
class Capture:
    """One probe captured at one step: taken on the training thread, then written in the background."""

    probe: Probe
    path: Path
    step: int
    seconds: float  # what training waited for it: the capture pass and any wait for the previous write
    bytes: int = 0  # known once written
    write_seconds: float = 0.0  # compressing and writing, off the training thread

    @property
    def shape(self) -> tuple[int, int]:
        """Windows, positions."""
        return len(self.probe.windows), len(self.probe.positions)


class Prober:
    """Validates a run's probes against its model before training, then captures them at validation time.

    Captures are written on a background thread (zlib releases the GIL while it compresses), one at a
    time: memory holds at most the capture being written and the one being taken. Training learns of
    finished writes through :meth:`written` and must call :meth:`wait` before it ends; both re-raise a
    failed write as :class:`CaptureWriteError`. The thread is a daemon: a run that dies with a write in
    flight exits without waiting for it (the trainer takes a capture missing at resume again)."""

    def __init__(
        self,
        specs: list[ProbeSpec],
        model: nn.Module,
        context: int,
        val_data: TokenData | None,
        device: torch.device,
        batch_size: int,
        seed: int,
        info: dict[str, Any],
        autocast: contextlib.AbstractContextManager[Any] | None = None,
        smoke: bool = False,
    ) -> None:
        self.model, self.device, self.batch_size, self.info = model, device, batch_size, info
        self.autocast = autocast or contextlib.nullcontext()
        self.span = (0, 0)  # rows of the current batch within the probe's windows, read by the hooks
        self.named = {name: m for name, m in model.named_modules() if name}
        self.probes: list[Probe] = []
        for spec in specs:
            for key in ("source_modules", "target_modules"):
                unknown = [m for m in getattr(spec, key) if m not in self.named]
                if unknown:
                    raise ConfigError(
                        f"probe {spec.name!r}.{key}: unknown module(s) {', '.join(unknown)}; "
                        f"valid modules: {', '.join(self.named)}"
                    )
            if val_data is None:
                raise ConfigError(f"probe {spec.name!r}: needs a validation split, and the data set has none")
            try:
                positions = resolve_positions(spec.positions, context, drop_outside=smoke)
            except ValueError as e:
                raise ConfigError(f"probe {spec.name!r}.positions: {e}") from None
            windows, cifs = subset_windows(val_data, spec.subset_size, context, seed)
            self.probes.append(Probe(spec, positions, windows, cifs))
        self.widths = self._check_outputs()
        self._writing: tuple[Capture, Future[tuple[int, float]]] | None = None
        self._written: list[Capture] = []

    def _check_outputs(self) -> dict[str, int]:
        """One tiny forward pass with the hooks: every probed module must run once per forward and return
        a (batch, tokens, width) tensor. Fails before training, not at the first validation."""
        modules = list(dict.fromkeys(m for p in self.probes for m in p.spec.modules))
        seen: dict[str, list[tuple[int, ...] | str]] = {m: [] for m in modules}

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: Any, output: Any) -> None:
                seen[name].append(tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__)

            return hook

        batch, tokens = 2, 3
        self._run(modules, hook_for, torch.zeros((batch, tokens), dtype=torch.long), batch)
        widths = {}
        for name, outputs in seen.items():
            if len(outputs) != 1:
                raise ConfigError(
                    f"module {name!r} ran {len(outputs)} times in one forward pass; probe one that runs once"
                )
            shape = outputs[0]
            if not (isinstance(shape, tuple) and len(shape) == 3 and shape[:2] == (batch, tokens)):
                raise ConfigError(
                    f"module {name!r} returns {shape}, not a (batch, tokens, width) tensor; it cannot be probed"
                )
            widths[name] = shape[2]
        return widths

    @torch.no_grad()
    def _run(
        self, modules: list[str], hook_for: Callable[[str], Callable[..., None]], windows: torch.Tensor, batch: int
    ) -> None:
        """Forward ``windows`` through the eager model in eval mode, ``batch`` at a time, hooks on ``modules``
        registered for this pass only."""
        handles = [self.named[m].register_forward_hook(hook_for(m)) for m in modules]
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, len(windows), batch):
                self.span = (lo, min(lo + batch, len(windows)))
                with self.autocast:
                    self.model(windows[lo : lo + batch].to(self.device))
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)

    def due(self, evaluation: int, final: bool) -> list[Probe]:
        """The probes to capture at the ``evaluation``-th validation of the run (1-based)."""
        return [p for p in self.probes if final or evaluation % p.spec.save_every_n_evals == 0]

    def capture(self, probe: Probe, path: Path, step: int, tokens_seen: int, epoch: float) -> Capture:
        """Run the probe's windows and start writing their activations to ``path`` in the background.
        If the previous capture is still being written, wait for it (re-raising its error) before handing
        this one over, so that no more than two captures are ever held."""
        started = time.perf_counter()
        payload = self._payload(probe, step, tokens_seen, epoch)
        self.wait()
        cap = Capture(probe, path, step, time.perf_counter() - started)
        future: Future[tuple[int, float]] = Future()

        def write() -> None:
            t0 = time.perf_counter()
            try:
                written = write_capture(path, payload)
            except BaseException as e:  # handed to the training thread, which raises it
                future.set_exception(e)
            else:
                future.set_result((written, time.perf_counter() - t0))

        threading.Thread(target=write, name="probe-writer", daemon=True).start()
        self._writing = (cap, future)
        return cap

    @property
    def writing(self) -> bool:
        """Whether a write was handed over and not yet collected (by :meth:`written` or :meth:`wait`)."""
        return self._writing is not None

    def written(self) -> list[Capture]:
        """The captures whose file has been renamed into place since the last call, without waiting."""
        if self._writing is not None and self._writing[1].done():
            self.wait()
        done, self._written = self._written, []
        return done

    def wait(self) -> None:
        """Block until no capture is being written (see :meth:`written` for the finished ones)."""
        if self._writing is None:
            return
        cap, future = self._writing
        self._writing = None
        try:
            cap.bytes, cap.write_seconds = future.result()
        except Exception as e:
            raise CaptureWriteError(
                f"probe {cap.probe.spec.name}: could not write its step-{cap.step} capture {cap.path}: "
                f"{type(e).__name__}: {e}"
            ) from e
        self._written.append(cap)

    def _payload(self, probe: Probe, step: int, tokens_seen: int, epoch: float) -> dict[str, Any]:
        """The probe's modules' outputs at its positions on its windows, as written to a capture file.
        Holds at most ``subset_size`` windows: one preallocated buffer per module."""
        spec = probe.spec
        dtype = DTYPES[spec.dtype]
        size, n_pos = len(probe.windows), len(probe.positions)
        buffers = {m: torch.empty((size, n_pos, self.widths[m]), dtype=dtype) for m in spec.modules}
        pos = torch.tensor(probe.positions, dtype=torch.long, device=self.device)

        def hook_for(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
                lo, hi = self.span
                buffers[name][lo:hi].copy_(output.index_select(1, pos).to(dtype))

            return hook

        self._run(spec.modules, hook_for, probe.windows, self.batch_size)
        metadata = {
            "format": FORMAT,
            "probe": spec.name,
            "step": int(step),
            "epoch": float(epoch),
            "tokens_seen": int(tokens_seen),
            **self.info,
            "source_modules": list(spec.source_modules),
            "target_modules": list(spec.target_modules),
            "subset_size": size,
            "windows": probe.cifs,
            "positions": probe.positions,
            "dtype": spec.dtype,
            "shapes": {m: list(b.shape) for m, b in buffers.items()},
        }
        return {
            "metadata": metadata,
            "source_activations": {m: buffers[m] for m in spec.source_modules},
            "target_activations": {m: buffers[m] for m in spec.target_modules},
            "labels": probe.windows[:, probe.positions],
        }


def write_capture(path: Path, payload: dict[str, Any]) -> int:
    """gzip(torch.save(payload)) to a temporary file beside ``path``, then rename; returns the size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with gzip.open(tmp, "wb", compresslevel=COMPRESS_LEVEL) as fh:
            torch.save(payload, fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def load_capture(path: str | Path) -> dict[str, Any]:
    """A capture file as written by :meth:`Prober.capture` (tensors on the CPU)."""
    path = Path(path)
    try:
        data = torch.load(io.BytesIO(gzip.decompress(path.read_bytes())), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: nothing of it has run
        raise ValueError(
            f"{path} is refused: it holds objects a probe capture may not hold (only tensors, numbers, strings "
            f"and containers are loaded): {str(e).splitlines()[0]}"
        ) from None
    except (OSError, EOFError, RuntimeError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is not a readable probe capture: {e}") from None
    if not isinstance(data, dict) or data.get("metadata", {}).get("format") != FORMAT:
        raise ValueError(f"{path} is not a probe capture ({FORMAT})")
    return data
