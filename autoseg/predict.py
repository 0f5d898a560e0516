"""``autoseg predict MODEL INPUT OUTPUT``: MODEL is a workdir or a bundle file; either way the cases go through
the one inference engine (:class:`autoseg.inference.Predictor`).

>>> predict("autoseg_work/Dataset001_CT", "imagesTs", "predictions")     # doctest: +SKIP
>>> predict("model.autoseg", "scan_0000.nii.gz", "out")                   # doctest: +SKIP
>>> predict("model.autoseg", "dicom/patient1", "out", output_format="seg")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from autoseg.artifacts import check_writable
from autoseg.bundle import load_bundle
from autoseg.errors import UserError
from autoseg.inference import PredictionSummary, Predictor
from autoseg.workdir import Workdir


def predict(model: Path | str, input: Path | str, output: Path | str, *, configuration: str | None = None,
            folds: Sequence[int] | None = None, device: str | None = None, mirror: str = "auto",
            overlap: float = 0.5, tile_batch: int | None = None, save_probabilities: bool = False,
            jobs: int = 1, progress: bool = True, report: Callable[[str], None] | None = None,
            report_model: Callable[[str], None] | None = None, storage: str = "float16",
            allow_large: bool = False, instances: bool | None = None, series: Sequence[str] = (),
            output_format: str | None = None, segment_codes: Path | str | None = None) -> PredictionSummary:
    """Segment the cases of ``input`` into ``output`` with the selected model of ``model`` (a workdir: plans.json
    and runs/; or a bundle file, :mod:`autoseg.bundle`); see :meth:`Predictor.predict_files` for INPUT and
    OUTPUT. The model is the selected one (an ensemble when selection chose one) unless ``configuration``
    forces one. A case whose resampling would need more memory than this machine has available is refused
    (one line) unless ``allow_large``; inputs unlike anything the model saw are predicted with a warning,
    logged and kept in the summary's ``warnings``. ``instances`` (None: on for a model whose dataset has
    instance classes) also writes ``output/instances/`` and ``output/instances.csv``. A folder of DICOM series is one case (``series`` chooses,
    ``output_format`` ``seg`` / ``rtstruct`` writes DICOM objects, each segment coded by the model's own codes
    (its bundle's manifest, or its selection.json's, from dataset.json) with ``segment_codes``, a JSON file of
    coded segment categories and types (:func:`autoseg.dicom.seg.read_segment_codes`), replacing them class by
    class)."""
    from autoseg.dicom.seg import read_segment_codes
    from autoseg.schema.segment_codes import check_codes, merge_codes

    model = Path(model)
    given = read_segment_codes(segment_codes) if segment_codes is not None else None
    check_writable(output, folder=True, what="predictions")  # before the model loads (inputs: once cases are known)
    options = dict(mirror=mirror, overlap=overlap, tile_batch=tile_batch, progress=progress, storage=storage,
                   allow_large=allow_large, instances=instances)
    if model.is_file():
        bundle = load_bundle(model)
        predictor, own = bundle.predictor(configuration, folds, device, **options), bundle.segment_codes
    elif not Workdir(model).plans_file.is_file():
        raise UserError(f"{model}: not a workdir (no {Workdir(model).plans_file.name}) nor a bundle file; give the "
                        "folder `autoseg plan` and `autoseg train` wrote to, or its model bundle")
    else:
        predictor = Predictor.from_workdir(model, configuration, folds, device, **options)
        own = workdir_segment_codes(Workdir(model), list(predictor.plans.scored_classes.values()))
    if given is not None:
        check_codes(given, list(predictor.plans.scored_classes.values()), segment_codes)
    codes = merge_codes(own, given) or None
    return predictor.predict_files(input, output, save_probabilities=save_probabilities, jobs=jobs, report=report,
                                   report_model=report_model, series=series, output_format=output_format,
                                   segment_codes=codes)


def workdir_segment_codes(work: Workdir, class_names: list[str]) -> dict[str, dict[str, tuple[str, str, str]]]:
    """The coded segment category and type per class selection.json keeps (dataset.json's), or {}: what a
    bundle packed from this workdir would carry."""
    from autoseg.schema.segment_codes import check_codes, parse_segment_codes

    selection = work.load_selection()
    if selection is None or not selection.segment_codes:
        return {}
    where = f"{work.selection_file}: segment_codes"
    codes = parse_segment_codes(selection.segment_codes, where)
    check_codes(codes, class_names, where)
    return codes
