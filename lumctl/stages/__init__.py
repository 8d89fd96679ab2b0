"""One module per stage; each exposes `run(spec, force=False) -> Path`."""
