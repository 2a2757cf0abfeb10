"""Output folders that never lose a user's file, and leave nothing half-written behind.

* `resolve_out`: where an `--out` really points (a symlink is followed to its target, which is where
  the output is written; the link itself stays); the current folder and its parents are refused.
* `is_bundle`: a folder is a bundle only when its `manifest.json` parses, validates against the schema,
  and every file it lists is there with the listed size. Only a bundle may be replaced by a build.
* `run_dir`: a run's output folder (train, bench): refused when it is a bundle or inside one, or when it
  exists and is not empty (unless `overwrite`); created only when results are written.
* staging: a build writes into `.<name>.staging-<pid>-<random>` beside its output. `remove_stale` removes
  the staging folders of builds whose process is gone (SIGKILL, power loss), and puts back a bundle
  that a killed build had moved aside (`.<name>.old-<pid>`) when no new one replaced it.
* `signals_interrupt`: SIGTERM and SIGHUP raise `Interrupted` (a KeyboardInterrupt), so the same
  clean-up that Ctrl-C gets runs before the process exits.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path


class OutputError(ValueError):
    """An output folder that cannot or must not be written; the message is one line for the user."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP; `signum` tells which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def resolve_out(out: Path | str, flag: str = "--out") -> Path:
    """The absolute folder `out` names, symlinks followed. The current folder and its parents are refused
    (a build replaces its output folder as a whole; a run should get a folder of its own)."""
    path = Path(out).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise OutputError(f"cannot use {flag} {out}: {e}") from None
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OutputError(f"{flag} {out} is the current folder or one of its parents; name a new folder, "
                          f"e.g. {flag} {Path(out) / 'bundle'}")
    return resolved


def check_creatable(out: Path, flag: str = "--out") -> None:
    """Refuse an output whose nearest existing ancestor is not a folder we can create entries in.

    Tries it (a temporary folder, removed at once): permission bits say nothing under /proc or on a
    read-only mount."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write to {out}: it exists and is not a folder")
    _probe_writable(out.parent, f"cannot write to {out}")


def file_target(path: Path | str, flag: str = "--out") -> Path:
    """Check that the file `path` can be written (its folder exists or can be created, and takes files);
    returns it absolute. Nothing is created."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        raise OutputError(f"cannot write {flag} {path}: it is a folder; name a file")
    _probe_writable(p.parent, f"cannot write {flag} {path}")
    return p


def _probe_writable(folder: Path, failure: str) -> None:
    """OutputError(`failure: why`) unless the nearest existing ancestor of `folder` (itself included) is a
    folder that takes new entries: tried with a temporary folder, removed at once."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{failure}: {existing} is not a folder")
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".ondevice-lora-probe-", dir=existing))
    except OSError as e:
        raise OutputError(f"{failure}: {existing} is not writable ({e.strerror or e})") from None


def is_bundle(folder: Path) -> tuple[bool, str]:
    """(True, "") for a bundle; else (False, why). A bundle's manifest parses, validates against the
    schema, and every file it lists exists with the listed size."""
    from exporter.manifest import ManifestError, validate

    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return False, "it has no manifest.json"
    try:
        manifest = json.loads(path.read_text())
        validate(manifest)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, "its manifest.json is not JSON"
    except ManifestError as e:
        return False, f"its manifest.json is not a bundle manifest ({e})"
    for rel, info in manifest["files"].items():
        f = Path(folder) / rel
        if not f.is_file() or f.stat().st_size != info["bytes"]:
            return False, f"{rel}, listed in its manifest, is missing or has another size"
    return True, ""


def check_replaceable(out: Path) -> None:
    """A build may replace `out` only when it does not exist, is an empty folder, or is a bundle."""
    if out.is_dir() and any(out.iterdir()):
        ok, why = is_bundle(out)
        if not ok:
            raise OutputError(f"{out} exists and is not a bundle; refusing to replace it ({why})")


def run_dir(out: Path | str, bundle: Path | None = None, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check a run's output folder before any work; returns it resolved. Nothing is created here."""
    path = resolve_out(out, flag)
    if bundle is not None:
        b = Path(bundle).resolve()
        if path == b or b in path.parents:
            raise OutputError(f"{flag} {out} is inside the bundle {bundle}; a run never writes into a bundle")
    if path.is_dir() and is_bundle(path)[0]:
        raise OutputError(f"{flag} {out} is a bundle; a run never writes into a bundle")
    check_creatable(path, flag)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputError(f"{flag} {out} exists and is not empty; pass --overwrite to replace the run's files, "
                          f"or choose another {flag}")
    return path


@contextlib.contextmanager
def removed_on_failure(folder: Path):
    """Remove `folder` when the block fails, if the block created it (an empty or partial run folder)."""
    existed = folder.exists()
    try:
        yield folder
    except BaseException:
        if not existed and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- staging

def staging_dir(out: Path) -> Path:
    """A new staging folder beside `out`, named for this process: `.<name>.staging-<pid>-<random>`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the published bundle is an ordinary folder
    return path


def aside_name(out: Path) -> Path:
    """Where a bundle being replaced waits until the new one is in place: `.<name>.old-<pid>`."""
    return out.parent / f".{out.name}.old-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Clean up after builds of `out` whose process is gone; returns what was removed or restored."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(staging|old)-(\d+)(-.*)?$")
    done = []
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or _alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and is_bundle(entry)[0]:
            entry.rename(out)  # killed between moving the old bundle aside and moving the new one in
        else:
            shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


@contextlib.contextmanager
def signals_interrupt(signals=(signal.SIGTERM, signal.SIGHUP)):
    """Within the block, `signals` raise Interrupted (so `finally`/`except` clean-up runs). Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_deferred(signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    """Hold `signals` until the block is done (they are delivered right after it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
