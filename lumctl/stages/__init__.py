"""One module per stage; each exposes `run(spec, force=False) -> Path`."""

from __future__ import annotations

import importlib

# stage -> module, in the order `lumctl run` follows
ORDER = {
    "synth": "lumctl.synth",
    "tokenize": "lumctl.stages.tokenize",
    "pack": "lumctl.stages.pack",
    "pretrain": "lumctl.stages.pretrain",
    "query": "lumctl.stages.query",        # only when the spec has a [query] section
    "fuse": "lumctl.stages.fuse",          # only when the spec has a [fuse] section
}


# verbs that are not part of `lumctl run`
OTHER = {"eval": "lumctl.stages.eval"}    # reads finished stores of many experiments (a report spec)


def stage_module(stage: str):
    return importlib.import_module(ORDER.get(stage) or OTHER[stage])


def run_all(spec, upto: str | None = None, force: bool = False) -> None:
    """Run every stage the spec has, in order, up to and including `upto`; up-to-date ones skip. Each stage
    holds its store's lock; the spec is checked against the vocabularies right after tokenize. A full run ends
    with the results table of its stores (lumctl.summary)."""
    from lumctl import summary
    from lumctl.checks import check_vocabularies
    from lumctl.store import store_lock
    for stage in ORDER:
        if getattr(spec, stage, None) is not None:
            with store_lock(spec.store(stage), stage):
                stage_module(stage).run(spec, force=force)
            if stage == "tokenize":
                check_vocabularies(spec)
        if stage == upto:
            break
    if upto is None:
        summary.show(spec)
