"""The demo a fresh clone runs without the dataset: the shipped model on generated images."""

from __future__ import annotations

import json
import re

from crackscan.demo import main


def test_demo_finds_the_generated_crack_and_says_what_the_scan_found(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # The generated patches: the two with a drawn crack are the crack class, the plain two are not.
    labels = {line.split()[-1].split("/")[-1]: line.split()[1] for line in out.splitlines()
              if line.strip().endswith(".jpg") and "patch-" in line}
    assert labels == {"patch-1-crack.jpg": "Positive", "patch-2-crack.jpg": "Positive",
                      "patch-3-plain.jpg": "Negative", "patch-4-plain.jpg": "Negative"}
    # The photo's crack is found, and the line says what the scan's JSON says.
    scan = json.loads((tmp_path / "scan" / "photo-generated.json").read_text())
    assert scan["is_crack"] and scan["regions"]
    said = re.search(r"verdict (CRACK|no crack), (\d+) region\(s\)", out)
    assert said and said.group(1) == "CRACK" and int(said.group(2)) == len(scan["regions"])
    assert "does not replace a professional structural assessment" in out
