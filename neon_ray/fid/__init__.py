"""FID on any registered torch-fidelity extractor: exact mergeable moments, reference statistics, precision/recall."""
