"""Pipeline stages. Each module exposes one entry: `<stage>(cfg: RunConfig, ...) -> manifest dict`."""
