#!/usr/bin/env python3
"""Outside references for mirage-rt's scanner readers.

    scanner_reference.py compare OURS.nii.gz REF.nii [--volume K]
        Both reoriented to the closest canonical (RAS) orientation with nibabel; prints JSON with
        the shapes, the largest voxel value difference and the largest distance (mm) between the
        world coordinates of the same voxel centre (over the grid's corners). REF may be a
        dcm2niix output or a Philips .PAR (read by nibabel's PARRECImage, display values);
        --volume K compares OURS's volume K with a 3-D REF; --slices A:B the values of slices
        A..B only.

    scanner_reference.py enhanced REF.nii OUTDIR
        Writes one Siemens XA-style enhanced (multi-frame) MR DICOM file per volume of REF,
        placing every frame with ImagePositionPatient / ImageOrientationPatient from REF's
        affine, with pydicom.

    scanner_reference.py wheel-series OUTDIR
        Copies every MR DICOM file that the installed nibabel (nicom test data) and pydicom (test
        files) wheels ship into OUTDIR/NAME/NAME (gunzipped), one series per folder; prints JSON
        with each name, manufacturer, transfer syntax and whether it is a mosaic.
"""
import argparse
import json
import os
import sys

import nibabel as nib
import numpy as np


def load(path, volume=None):
    img = nib.load(path)
    if path.lower().endswith(".par"):
        img = nib.parrec.load(path, scaling="dv", strict_sort=True)
    magnitude = None
    if path.lower().endswith(".par"):
        types = list(img.header.get_volume_labels().get("image_type_mr", [0]))
        magnitude = types.index(0) if 0 in types else 0
    img = nib.as_closest_canonical(img)
    data = img.get_fdata(dtype=np.float64)
    if magnitude is not None and data.ndim == 4:
        data = data[..., magnitude]
    if volume is not None and data.ndim == 4:
        data = data[..., volume]
    return data, img.affine


def compare(args):
    ours, a = load(args.ours, args.volume)
    ref, b = load(args.ref)
    if ref.ndim == 4 and ref.shape[3] == 1:
        ref = ref[..., 0]
    out = {"ours_shape": list(ours.shape), "ref_shape": list(ref.shape)}
    if ours.shape[:3] == ref.shape[:3] and ours.ndim == ref.ndim:
        a0, b0 = (int(x) for x in args.slices.split(":")) if args.slices else (0, ours.shape[2])
        out["max_value_diff"] = float(np.abs(ours[:, :, a0:b0] - ref[:, :, a0:b0]).max())
        out["max_value"] = float(np.abs(ref).max())
        n = ours.shape[:3]
        corners = np.array([[i, j, k, 1] for i in (0, n[0] - 1) for j in (0, n[1] - 1) for k in (0, n[2] - 1)]).T
        out["max_mm"] = float(np.abs((a @ corners) - (b @ corners))[:3].max())
        out["voxel_mm"] = [float(x) for x in np.sqrt((a[:3, :3] ** 2).sum(0))]
    print(json.dumps(out))


def enhanced(args):
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    img = nib.load(args.ref)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 3:
        data = data[..., None]
    A = img.affine
    lps = np.diag([-1.0, -1.0, 1.0])
    col_step, row_step, slice_step = (lps @ A[:3, 0]), (lps @ A[:3, 1]), (lps @ A[:3, 2])
    row_cos = col_step / np.linalg.norm(col_step)   # along increasing column index (i)
    col_cos = row_step / np.linalg.norm(row_step)   # along increasing row index (j)
    spacing = [float(np.linalg.norm(row_step)), float(np.linalg.norm(col_step))]
    ni, nj, nk, nt = data.shape
    series, study = generate_uid(), generate_uid()
    os.makedirs(args.outdir, exist_ok=True)
    for t in range(nt):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(args.outdir, f"xa_{t + 1:05d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study, series, 13
        ds.AcquisitionNumber = ds.InstanceNumber = t + 1
        ds.AcquisitionDateTime = f"20261126101500.{t:06d}"
        ds.Rows, ds.Columns, ds.NumberOfFrames = nj, ni, nk
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        shared = Dataset()
        po = Dataset()
        po.ImageOrientationPatient = [float(v) for v in np.r_[row_cos, col_cos]]
        pm = Dataset()
        pm.PixelSpacing = spacing
        pm.SliceThickness = pm.SpacingBetweenSlices = float(np.linalg.norm(slice_step))
        timing = Dataset()
        timing.RepetitionTime = 1000.0
        shared.PlaneOrientationSequence = Sequence([po])
        shared.PixelMeasuresSequence = Sequence([pm])
        shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        frames = []
        for k in range(nk):
            f = Dataset()
            pp = Dataset()
            pp.ImagePositionPatient = [float(v) for v in (lps @ (A @ [0, 0, k, 1])[:3])]
            fc = Dataset()
            fc.StackID, fc.InStackPositionNumber, fc.TemporalPositionIndex = "1", k + 1, 1
            fc.DimensionIndexValues = [1, k + 1]
            fc.FrameAcquisitionDateTime = ds.AcquisitionDateTime
            f.PlanePositionSequence = Sequence([pp])
            f.FrameContentSequence = Sequence([fc])
            frames.append(f)
        ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
        # Frame k is REF's slice k with rows along j and columns along i.
        ds.PixelData = np.ascontiguousarray(
            np.stack([data[:, :, k, t].T for k in range(nk)]).astype("<u2")).tobytes()
        ds.save_as(path, enforce_file_format=True)
    print(json.dumps({"files": nt, "frames": nk}))


def wheel_series(args):
    import glob
    import gzip
    import shutil

    import pydicom

    roots = [os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data"),
             os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")]
    found = []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "*.dcm")) + glob.glob(os.path.join(root, "*.dcm.gz"))):
            name = os.path.basename(path).removesuffix(".gz")
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                try:
                    ds = pydicom.dcmread(f, stop_before_pixels=True)
                except Exception:
                    continue
            if ds.get("Modality") != "MR":
                continue
            folder = os.path.join(args.outdir, name)
            os.makedirs(folder, exist_ok=True)
            with opener(path, "rb") as src, open(os.path.join(folder, name), "wb") as dst:
                shutil.copyfileobj(src, dst)
            mosaic = "MOSAIC" in list(ds.get("ImageType", []))
            # A mosaic whose side is not a multiple of its tile grid (Siemens pads it).
            padded_grid = None
            if mosaic:
                from nibabel.nicom import csareader
                try:
                    n = csareader.get_n_mosaic(csareader.get_csa_header(ds))
                    m = int(np.ceil(np.sqrt(n)))
                    if int(ds.Rows) % m or int(ds.Columns) % m:
                        padded_grid = m
                except Exception:
                    pass
            found.append({"name": name, "source": path, "manufacturer": str(ds.get("Manufacturer", "")),
                          "transfer_syntax": str(ds.file_meta.get("TransferSyntaxUID", "")),
                          "mosaic": mosaic, "padded_grid": padded_grid})
    print(json.dumps(found))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare")
    c.add_argument("ours")
    c.add_argument("ref")
    c.add_argument("--volume", type=int)
    c.add_argument("--slices", help="A:B: compare values of canonical slices A..B only")
    e = sub.add_parser("enhanced")
    e.add_argument("ref")
    e.add_argument("outdir")
    w = sub.add_parser("wheel-series")
    w.add_argument("outdir")
    args = ap.parse_args()
    {"compare": compare, "enhanced": enhanced, "wheel-series": wheel_series}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
