"""The runtime layer below the stages: Ray connection, per-image seeds, sample sets in Parquet, the sampling
and feature actors, model loading, progress lines. Stages compose these; nothing here knows about stages."""
