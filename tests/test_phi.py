"""No patient identifier leaves the data: a full run from DICOMs with planted identifiers (issue 9).

DICOMs carry PatientName, PatientID, PatientBirthDate, AccessionNumber and InstitutionName. They are
indexed (`remedis data index`, which pseudonymises PatientID with a salted HMAC) and run through every
stage (distillation included); then the manifest, every file of the run folder (reports, checkpoint metadata, weights, logs)
and the console output are scanned byte by byte for each planted value.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from remedis.data.synthetic import write_dicom


def _plant(folder: Path) -> list[str]:
    planted = ["St Private Hospital PHI", "19561203"]
    rng = np.random.default_rng(0)
    n = 0
    for site in ("VendorA", "VendorB"):
        for label in ("benign", "malignant"):
            for patient in range(10):
                n += 1
                pid, name, acc = f"PHI-ID-{n:05d}", f"Doe^Jane{n:03d}PHI", f"ACC{n:06d}X"
                planted += [pid, name, acc]
                for image in range(2):
                    pixels = rng.normal(1500, 300, (32, 32))
                    if label == "malignant":
                        pixels[10:22, 10:22] += 1200
                    path = folder / label / f"{site}-{n}-{image}.dcm"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_dicom(path, np.clip(pixels, 0, 4095).astype(np.uint16), pid, site, uid_seed=f"{n}-{image}")
                    ds = pydicom.dcmread(path)
                    ds.PatientName, ds.PatientBirthDate, ds.AccessionNumber = name, "19561203", acc
                    ds.InstitutionName = "St Private Hospital PHI"
                    ds.save_as(path)
    return planted


def test_planted_identifiers_appear_nowhere(tmp_path):
    planted = _plant(tmp_path / "dicoms")
    manifest = tmp_path / "manifest.csv"
    index = subprocess.run([sys.executable, "-m", "remedis.cli", "data", "index", str(tmp_path / "dicoms"), "-o", str(manifest),
                            "--label-from-folder", "--salt-file", str(tmp_path / "salt")], capture_output=True, text=True, timeout=300)
    assert index.returncode == 0, index.stderr[-2000:]
    config = tmp_path / "c.yaml"
    config.write_text(f"""
data: {{manifest: {manifest}, source_site: VendorA, target_site: VendorB, image_size: 32}}
model: {{backbone: resnet18}}
pretrain: {{supervised: {{epochs: 1, batch_size: 16}}, simclr: {{epochs: 1, batch_size: 16}}}}
adapt: {{fractions: [1.0], backbones: [remedis], epochs: 1, min_steps: 0, batch_size: 8, distill_student: resnet18, distill_epochs: 1}}
evaluate: {{bootstrap: 10}}
serve: {{model: remedis@1.0, build: false}}
""")
    run = subprocess.run([sys.executable, "-m", "remedis.cli", "run", str(config), "-o", str(tmp_path / "run"), "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = (tmp_path / "run" / "report.json").read_text()
    assert '"remedis@1-student-resnet18"' in report  # the distilled student went through every stage too
    scanned = [manifest, *[p for p in (tmp_path / "run").rglob("*") if p.is_file()]]
    assert len(scanned) > 10
    blobs = {str(p): p.read_bytes() for p in scanned}
    blobs["console"] = (index.stdout + index.stderr + run.stdout + run.stderr).encode()
    leaks = [(where, value) for where, blob in blobs.items() for value in planted if value.encode() in blob]
    assert not leaks, leaks[:10]
