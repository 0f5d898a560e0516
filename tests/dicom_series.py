"""Synthetic volumes written as real DICOM series, for the tests of :mod:`autoseg.dicom`.

Each slice is one file written with pydicom (CT Image Storage with rescale slope and intercept, or MR Image
Storage), positioned by ImagePositionPatient along the normal of ImageOrientationPatient, so an oblique
volume, a shuffled file order, files with and without ``.dcm`` and several series in one folder are what a
reader meets in a hospital export. The geometry is given the way SimpleITK states it (spacing x, y, z;
origin; direction with the axes as columns), so a test can compare the reader's image with the one written.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

STORAGE = {"CT": CTImageStorage, "MR": MRImageStorage}


@dataclass(frozen=True)
class Study:
    """The patient and study a series belongs to (several series of one study share it)."""

    patient_id: str = "ANON0001"
    patient_name: str = "Test^Patient"
    study_uid: str = ""
    frame_of_reference_uid: str = ""

    @staticmethod
    def new(patient_id: str = "ANON0001") -> Study:
        return Study(patient_id, f"Test^{patient_id}", generate_uid(), generate_uid())


def oblique_direction(degrees: float = 20.0) -> tuple[float, ...]:
    """A rotation about the z axis then the x axis by ``degrees`` each: no axis along a patient axis."""
    a = np.deg2rad(degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return tuple((rx @ rz).ravel().tolist())


def volume_image(array: np.ndarray, spacing=(0.8, 0.7, 2.5), origin=(-20.0, 15.0, 30.0),
                 direction: tuple[float, ...] | None = None) -> sitk.Image:
    """``array`` (z, y, x) as a SimpleITK image with that geometry (spacing and origin x, y, z)."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(direction or tuple(np.eye(3).ravel().tolist()))
    return img


def write_series(image: sitk.Image, folder: Path | str, *, modality: str = "CT", slope: float = 1.0,
                 intercept: float = -1024.0, extension: str = ".dcm", shuffle: bool = True, seed: int = 0,
                 study: Study | None = None, series_uid: str | None = None, description: str = "synthetic",
                 series_number: int = 1, name_prefix: str = "") -> list[Path]:
    """Write ``image`` (3D, values in modality units: HU for CT) as one DICOM file per slice into ``folder``.

    Stored values are ``round((value - intercept) / slope)`` as int16 (CT); MR is stored as uint16 without
    rescale. Files are named ``<prefix>IM<nnnn><extension>`` with the numbers in a shuffled order (unless
    ``shuffle`` is False), so file names say nothing about slice order. Returns the files, slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = study or Study.new()
    series_uid = series_uid or generate_uid()
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    if array.ndim != 3:
        raise ValueError("write_series writes 3D images")
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    origin = np.array(image.GetOrigin())
    if modality == "CT":
        stored = np.round((array - intercept) / slope).astype(np.int16)
    else:
        stored = np.round(array).astype(np.uint16)
    names = list(range(array.shape[0]))
    if shuffle:
        random.Random(seed).shuffle(names)
    files = []
    for k in range(array.shape[0]):
        position = origin + k * spacing[2] * normal
        ds = _slice(stored[k], modality, study, series_uid, description, series_number, k, position, row, col,
                    spacing, slope, intercept)
        path = folder / f"{name_prefix}IM{names[k]:04d}{extension}"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _slice(pixels: np.ndarray, modality: str, study: Study, series_uid: str, description: str, series_number: int,
           k: int, position: np.ndarray, row: np.ndarray, col: np.ndarray, spacing: np.ndarray, slope: float,
           intercept: float) -> Dataset:
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = STORAGE[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = STORAGE[modality], sop_uid
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = study.patient_name, study.patient_id, "", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.StudyDate, ds.StudyTime = study.study_uid, "1", "20260101", "120000"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
    ds.Modality, ds.Manufacturer = modality, "autoseg tests"
    ds.PatientPosition, ds.BodyPartExamined = "HFS", "ABDOMEN"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study.frame_of_reference_uid, ""
    ds.InstanceNumber = k + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row, *col)]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing (y), column spacing (x)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "3D"
        ds.EchoTrainLength, ds.RepetitionTime, ds.EchoTime = 1, "500", "10"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def corrupt(path: Path) -> None:
    """Cut a DICOM file in the middle of its pixel data, as an interrupted copy leaves it."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) - 200])
