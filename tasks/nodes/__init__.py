"""DAG node entry points: each a thin function over a typed config, input paths and an output path.

A node checks its inputs, calls components, and writes its output and manifest. Nodes never import
other nodes, so each can run alone: under the driver, in a test, or by hand."""
