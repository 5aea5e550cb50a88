"""Science of slimmoe: one module per kind of DAG node, each runnable on its own."""
