"""Seeds -> pseudo labels: dense CRF, PSA (AffinityNet + random walk) and the plain threshold."""
