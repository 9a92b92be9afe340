"""A stage's contract: what it reads and writes, declared once beside its code; keys and the stage graph follow."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.store.artifacts import key_of


@dataclass(frozen=True)
class Contract:
    """Everything the pipeline needs to know about a stage, declared in the stage's own module.

    The stage function is called as `run(cfg=<its config section>, **<shared settings>, **<upstream
    directories>, out=<staging directory>[, progress=...])`; its artifact key hashes exactly the settings it
    receives, the keys of the artifacts it reads and its code version, so the two cannot disagree.
    """

    stage: str
    run: Callable[..., dict[str, Any]]
    section: str  # the PipelineConfig field the stage receives as `cfg`
    reads: dict[str, str]  # run() parameter -> the upstream stage whose artifact directory it receives
    writes: tuple[str, ...]  # files every artifact of the stage holds
    code: tuple[str, ...]  # modules whose source is the stage's code version
    after: tuple[str, ...] = ()  # stages that must have passed first (gates), though their files are not read
    # Run-wide settings it also depends on, by name (`tasks.pipeline.graph.shared_settings`).
    shared: tuple[str, ...] = ()
    keyed: tuple[str, ...] | None = None  # fields of the section that change its output; None: all of them
    progress: bool = False  # run() takes a per-epoch progress callback

    @property
    def upstream(self) -> tuple[str, ...]:
        return (*self.reads.values(), *self.after)

    def code_version(self) -> str:
        """Hash of the source files the stage's output depends on, and of the names of the files it writes.

        The file names count because readers find files by name: renaming one must not leave a stored artifact
        under the same key without the file its readers now ask for.
        """
        digest = hashlib.sha256("\0".join(self.writes).encode())
        for name in self.code:
            spec = importlib.util.find_spec(name)
            if spec is None or spec.origin is None:
                raise ImportError(f"cannot find the source of {name}")
            digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
        return digest.hexdigest()[:16]

    def key_inputs(self, section: BaseModel, shared: dict[str, Any], upstream_keys: dict[str, str]) -> dict[str, Any]:
        """What the artifact key is the hash of: stage, code version, the settings received, the upstream keys."""
        keyed = None if self.keyed is None else set(self.keyed)
        return {
            "stage": self.stage,
            "code_version": self.code_version(),
            "config": {self.section.rstrip("_"): section.model_dump(mode="json", by_alias=True, include=keyed),
                       **{name: shared[name] for name in self.shared}},
            "upstream": {stage: upstream_keys[stage] for stage in self.upstream if stage in upstream_keys},
        }

    def key(self, section: BaseModel, shared: dict[str, Any], upstream_keys: dict[str, str]) -> str:
        return key_of(self.key_inputs(section, shared, upstream_keys))
