"""Metrics of the evaluation tasks: answer normalisation and token overlap (:mod:`.text`) and the
IFEval instruction checkers (:mod:`.ifeval`, imported on use: it loads langdetect and Punkt)."""
