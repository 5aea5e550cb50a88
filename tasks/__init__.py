"""The science of slimmoe: components (core, data, slimming, trimming, mcmoe, evaluation, pretraining)
and the DAG's node entry points that use them (nodes). See docs/architecture.md."""
