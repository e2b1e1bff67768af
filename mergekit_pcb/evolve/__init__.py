"""The search engine: a population of checkpoints mutated, crossed over and selected by a
fitness measured on the user's data, resumable and parallel. Strategies (`evolver`, ...)
live in `strategies/`; the population's merge is the merge engine's."""
