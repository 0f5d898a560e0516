"""Synthetic segmentation tasks in the nnU-Net v2 raw layout, from unit-test size to benchmark size.

``autoseg synth TASK OUT_DIR [--cases N] [--size tiny|small|bench] [--seed S]`` or, from Python::

    from autoseg.synth import generate
    root = generate("ct-aniso", "data/Dataset001_CT", size="tiny", seed=0)

Tasks are registered by name in :data:`TASKS` (see ``autoseg synth --help``); each writes
``imagesTr``/``labelsTr`` and a few held-out cases in ``imagesTs`` with reference labels in ``labelsTs``;
instance tasks (``nuclei``, ``brain-mets``, ``lung-nodules``) also write ``instancesTr``/``instancesTs``.
"""

from autoseg.synth import nuclei as _nuclei  # noqa: F401  (registers the instance task)
from autoseg.synth import tasks as _tasks  # noqa: F401  (registers the tasks)
from autoseg.synth.core import SIZES, TASKS, SynthCase, TaskSpec, draw_case, generate, register_task

__all__ = ["SIZES", "TASKS", "SynthCase", "TaskSpec", "draw_case", "generate", "register_task"]
