"""Ray Tune search spaces and experiments for Neon's w (and, later, the CFG scale)."""
