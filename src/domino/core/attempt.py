"""A run's record in its output directory is written only once the run is accepted.

Hydra would write `<dir>/.hydra/{config,hydra,overrides}.yaml` and open `<dir>/<task>.log` before a
stage can look at the directory, so a command refused there (the directory is locked by another
run, or holds a run of another config or other inputs) used to rewrite the record of the run it was
refused from. Here Hydra writes neither (`hydra.output_subdir: null`, no file handler in
conf/hydra/default.yaml): the entry point buffers the attempt's log records (`begin`), and the stage
calls `accept(out_dir)` once it holds the directory's lock and has checked that the directory's
state is its own; only then are the record files written (atomically) and the buffered lines,
and every later one, appended to the stage log. A refused attempt leaves the directory as it was.

Every failure a user can cause ends in one line (`one_line`) on stderr, and in the stage log when the
run had been accepted; `HYDRA_FULL_ERROR=1` shows the traceback instead.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class _Buffer(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _State:
    buffer: _Buffer | None = None
    file: logging.Handler | None = None
    accepted: Path | None = None
    task_cfg: Any = None


def _hydra_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig
        if not HydraConfig.initialized():
            return None
        return Path(HydraConfig.get().runtime.output_dir).resolve()
    except Exception:  # noqa: BLE001 - outside a Hydra app
        return None


def begin() -> None:
    """Start an attempt: buffer log records until the stage accepts the run (entry points only)."""
    end()
    _State.buffer = _Buffer()
    logging.getLogger().addHandler(_State.buffer)


def end() -> None:
    root = logging.getLogger()
    for h in (_State.buffer, _State.file):
        if h is not None:
            root.removeHandler(h)
            h.close()
    _State.buffer = _State.file = _State.accepted = None


def accept(out_dir: str | os.PathLike, task_name: str | None = None) -> None:
    """The stage owns `out_dir` (lock held, state checked): write Hydra's record of this run there
    and start its log. Only for the directory of the Hydra app this process runs (a study composes
    stages in-process: their directories get no second record), once, on the launching rank."""
    from domino.core.locking import launched_rank
    out = Path(out_dir).resolve()
    hydra_dir = _hydra_dir()
    if hydra_dir is None or out != hydra_dir or _State.accepted is not None or launched_rank():
        return
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from domino.core.records import write_text_atomic
    hc = HydraConfig.get()
    record = out / ".hydra"
    if _State.task_cfg is not None:
        write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(_State.task_cfg))
    write_text_atomic(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hc})))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(list(hc.overrides.task)))
    name = task_name or (_State.task_cfg.get("task_name") if _State.task_cfg is not None else None) or hc.job.name
    fh = logging.FileHandler(out / f"{name}.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    if _State.buffer is not None:
        for rec in _State.buffer.records:
            if rec.levelno >= root.getEffectiveLevel():
                fh.handle(rec)
        root.removeHandler(_State.buffer)
        _State.buffer = None
    root.addHandler(fh)
    _State.file, _State.accepted = fh, out


REMEDY = {errno.ENOSPC: "free space there and rerun the same command (finished work is kept and resumed)",
          errno.EROFS: "the filesystem is read-only: choose another output directory (hydra.run.dir=... or "
                       "output_dir=...)",
          errno.EACCES: "no permission: choose another output directory (hydra.run.dir=... or output_dir=...)",
          errno.ENOTDIR: "a path component is a regular file, not a directory: choose another output directory",
          errno.EEXIST: "a regular file is in the way: choose another output directory"}


def one_line(exc: BaseException, where: str | os.PathLike | None = None) -> str:
    """The message a user acts on: the exception's own text on one line; an OSError (however
    deeply chained) names its file, or `where`, and the remedy."""
    os_err = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in REMEDY), None)
    if os_err is not None:
        place = os_err.filename or where
        return " ".join(f"{os_err.strerror or os_err}{f': {place}' if place else ''}; {REMEDY[os_err.errno]}".split())
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return " ".join(msg.split())


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Preflight(Callback):
    """Hydra callback (conf/hydra/default.yaml): the run directory must be creatable and writable
    before Hydra creates it, else one line and exit status 1 (not Hydra's traceback)."""

    def on_run_start(self, config: Any, **_: Any) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: Any, **_: Any) -> None:
        self._check(config.hydra.sweep.dir)

    def _check(self, directory: Any) -> None:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return
        path = Path(str(directory)).expanduser()
        try:
            if path.exists() and not path.is_dir():
                raise FileExistsError(errno.EEXIST, "the output directory is a regular file", str(path))
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".domino-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            print(f"output directory {path}: {one_line(e, path)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


def run(stage: str, cfg: Any, fn: Callable[[Any], Any]) -> Any:
    """What an entry point runs: `fn(cfg)` as one attempt. A failure is one line on stderr (and in
    the stage log if the run was accepted) and exit status 1; HYDRA_FULL_ERROR=1 re-raises it."""
    begin()
    _State.task_cfg = cfg
    try:
        return fn(cfg)
    except Exception as e:  # noqa: BLE001 - every failure ends here, as one line
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        line = f"{stage}: {one_line(e, _State.accepted or _hydra_dir())}"
        if _State.file is not None:  # the stage log gets the line too (the console gets it once, below)
            _State.file.handle(logging.LogRecord(stage, logging.ERROR, __file__, 0, line, None, None))
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        end()
        _State.task_cfg = None
