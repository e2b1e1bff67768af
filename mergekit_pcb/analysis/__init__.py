"""`pcbmerge analyze`: why a merge will lose accuracy, layer by layer, before and after it.

`metrics` holds the pure functions of one tensor's task vectors; `report` aggregates them
per layer and model part and writes the report; `run` streams a recipe's tensors through
them with the merge engine's readers.
"""
