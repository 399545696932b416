"""The suite's own inputs: the official Omniglot zips are there and whole, and a missing one
fails the run, naming the file and how to provide it; it is never skipped."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_VAR = "MMTL_OMNIGLOT_DIR"
# (characters, alphabets) of each official zip; every character is drawn by 20 people
ZIP_CONTENTS = {"images_background": (964, 30), "images_evaluation": (659, 20),
                "images_background_small1": (136, 5), "images_background_small2": (156, 5)}


def test_the_official_omniglot_zips_are_whole(omniglot_zips):
    assert set(omniglot_zips) == set(ZIP_CONTENTS)
    for stem, path in omniglot_zips.items():
        with zipfile.ZipFile(path) as archive:
            images = [n.split("/") for n in archive.namelist() if n.endswith(".png")]
        assert {top for top, *_ in images} == {stem}, path
        drawings = collections.Counter((alphabet, character) for _, alphabet, character, _ in images)
        assert set(drawings.values()) == {20}, path
        assert (len(drawings), len({a for a, _ in drawings})) == ZIP_CONTENTS[stem], path


@pytest.mark.parametrize("setting", ["empty MMTL_OMNIGLOT_DIR", "no MMTL_OMNIGLOT_DIR, no shared folder"])
def test_a_missing_omniglot_zip_fails_the_run_naming_it_and_the_fix(tmp_path, setting):
    """The test above, run by pytest in a subprocess without the zips: its outcome is 'failed'
    (the fixture's setup), nothing is 'skipped', pytest exits non-zero, and the message names
    the missing files, where they were looked for and MMTL_OMNIGLOT_DIR."""
    empty, hidden, log = tmp_path / "empty", tmp_path / "no-shared-folder", tmp_path / "reports"
    empty.mkdir()
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    hide = ("" if setting.startswith("empty") else  # an explicit folder is the only place looked
            f"sources.shared_data_dir = lambda: Path({str(hidden)!r})")
    (plugins / "record_reports.py").write_text(textwrap.dedent(f"""
        import json
        from pathlib import Path
        from mmtl_tf.data import sources
        {hide}

        def pytest_runtest_logreport(report):
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps({{"when": report.when, "outcome": report.outcome,
                                    "text": report.longreprtext}}) + "\\n")
        """))
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(plugins), str(REPO)])
    if setting.startswith("empty"):
        env[ENV_VAR] = str(empty)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "record_reports",
         f"{Path(__file__).name}::test_the_official_omniglot_zips_are_whole"],
        cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=120)
    reports = [json.loads(line) for line in log.read_text().splitlines()]
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert [r["outcome"] for r in reports if r["when"] == "setup"] == ["failed"], reports
    assert not [r for r in reports if r["outcome"] == "skipped"], reports
    message = next(r["text"] for r in reports if r["outcome"] == "failed")
    for stem in ZIP_CONTENTS:
        assert f"{stem}.zip" in message, message
    assert f"Set {ENV_VAR}=<folder holding them>" in message
    assert str(empty if setting.startswith("empty") else hidden) in message
