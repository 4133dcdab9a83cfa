"""The DVC stages' entry points: ``python -m pipeline.stages.<name>`` (dvc.yaml) and ``deltamem <verb>``.

One module per stage (:mod:`~pipeline.stages.prepare`, :mod:`~pipeline.stages.backbone`,
:mod:`~pipeline.stages.train`, :mod:`~pipeline.stages.evaluate`, :mod:`~pipeline.stages.report`), each with a
``main(argv) -> int`` that parses the arguments, loads its params section through :mod:`pipeline.params`,
runs the stage's code, logs to MLflow and returns the exit status (0; 2 for bad input, one line, no
traceback; 1 for a failure after the work started).

Run as modules from the repository root (DVC's default working folder), so the checkout's root is first on
``sys.path``: a stage, and the torchrun workers and Ray actors it starts in the same folder, import this
checkout's ``pipeline`` and ``deltamem`` even when another checkout is installed (``pip install -e``).
"""
