"""What pybids finds in a `mirage export` dataset, derivatives included.

usage: pybids_check.py BIDS_DIR
Prints JSON: subjects, tasks, runs, and per kind the files found (relative to BIDS_DIR), and the
bold's RepetitionTime as pybids reads it from the sidecar.
"""
import json
import os
import sys
import warnings

warnings.simplefilter("ignore")
from bids import BIDSLayout  # noqa: E402


def main():
    root = sys.argv[1]
    layout = BIDSLayout(root, derivatives=True)
    rel = lambda files: sorted(os.path.relpath(f, root) for f in files)
    bold = layout.get(suffix="bold", extension=".nii.gz", scope="raw", return_type="filename")
    out = {
        "subjects": layout.get_subjects(),
        "tasks": layout.get_tasks(),
        "runs": layout.get_runs(),
        "bold": rel(bold),
        "events": rel(layout.get(suffix="events", extension=".tsv", return_type="filename")),
        "realigned": rel(layout.get(desc="realigned", suffix="bold", extension=".nii.gz", return_type="filename")),
        "confounds": rel(layout.get(desc="confounds", suffix="timeseries", extension=".tsv", return_type="filename")),
        "latency": rel(layout.get(desc="latency", suffix="summary", return_type="filename")),
        "trial_betas": rel(layout.get(desc="trials", suffix="betas", extension=".nii.gz", return_type="filename")),
        "mask": rel(layout.get(desc="glm", suffix="mask", return_type="filename")),
        "design": rel(layout.get(desc="glm", suffix="design", return_type="filename")),
        "roi": rel(layout.get(desc="roi", suffix="timeseries", return_type="filename")),
        "decode": rel(layout.get(desc="decode", suffix="results", return_type="filename")),
        "repetition_time": layout.get_metadata(bold[0]).get("RepetitionTime") if bold else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
