"""Plumbing of slimmoe: workflow configs, the cached DAG driver, and the command line."""
