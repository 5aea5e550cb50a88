"""Components every method uses: model adapters, checkpoints, parameter counts, fingerprints, atomic writes, runtime helpers."""
