"""The DVC stages' entry points: ``python -m pipeline.stages.<name>`` (dvc.yaml) and ``deltamem <verb>``.

One module per stage (:mod:`~pipeline.stages.prepare`, :mod:`~pipeline.stages.backbone`,
:mod:`~pipeline.stages.train`, :mod:`~pipeline.stages.evaluate`, :mod:`~pipeline.stages.report`), each with a
``main(argv) -> int`` that parses the arguments, loads its params section through :mod:`pipeline.params`
(which validates the whole file), runs the stage's code, decides MLflow tracking (``--no-tracking``) and
returns the exit status (0; 2 for bad input, one line, no traceback; 1 for a failure after the work
started). ``prepare`` and ``report`` log their runs here. ``train`` logs from its main rank
(:class:`pipeline.train.run.StageRun`, per-step metrics; under torchrun or Ray Train that is not the stage's
process) and ``evaluate`` at the end of :func:`pipeline.eval.runner.run_evaluate`
(:mod:`pipeline.eval.tracking`: a parent run with one nested run per unit).

Run as modules from the repository root (DVC's default working folder), so the checkout's root is first on
``sys.path``: a stage, and the torchrun workers and Ray actors it starts in the same folder, import this
checkout's ``pipeline`` and ``deltamem`` even when another checkout is installed (``pip install -e``).
"""
