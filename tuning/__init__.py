"""The search for Neon's w with Ray Tune: search spaces, the trial, the MLflow callback, running a search."""
