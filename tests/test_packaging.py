"""An installed wheel puts one distinctive top-level name into site-packages, with its data files."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_only_the_llamaduo_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    [wheel] = tmp_path.glob("llamaduo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert all(t == "llamaduo" or t.endswith(".dist-info") for t in top), top
    assert "llamaduo/services/controller/app.py" in names
    assert "llamaduo/tasks/data/invoice.jsonl" in names and "llamaduo/tasks/invoice_demo.yaml" in names
    assert not any(n.startswith(("shared/", "services/", "tests/")) for n in names)
