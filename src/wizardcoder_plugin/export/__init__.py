"""Export: fixed-shape graphs, the exported folder's writer and runner, MindSpore Lite's worker."""
