"""What the image installs is read in one place (script/image_pins.py), and the tools that need it agree with it:
script/setup's .venv, the GPU kit (script/device-kit) and the runtime-only environment of tests/test_runtime_deps.py.
Fast and offline: no wheel is downloaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers.runtime_only import ROOT, runtime_distributions

sys.path.insert(0, str(ROOT / "script"))

import device_kit  # noqa: E402
import image_pins  # noqa: E402

REQUIREMENTS = "# header\ntorch==2.14.1  # comment\nPyYAML==6.0.3\n-r other.txt\n"
COG = """build:
  gpu: true
  python_version: "3.11"
  sdk_version: "0.23.1" # comment
  run:
    # a comment between items
    - "PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-cache-dir --no-deps pruna==0.3.4 peft==0.18.1"
    - command: pip install coglet==0.23.1
    - echo done
predict: "predict.py:Predictor"
"""


def test_the_reader_reads_both_files_as_cog_runs_them():
    found = image_pins.read(requirements_text=REQUIREMENTS, cog_yaml=COG)
    assert {n: p.version for n, p in found["requirements"].items()} == {"torch": "2.14.1", "pyyaml": "6.0.3"}
    assert image_pins.run_lines(COG) == [
        "PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-cache-dir --no-deps pruna==0.3.4 peft==0.18.1",
        "pip install coglet==0.23.1", "echo done"]
    assert {n: (p.version, p.nodeps) for n, p in found["run"].items()} == {
        "pruna": ("0.3.4", True), "peft": ("0.18.1", True), "coglet": ("0.23.1", False)}
    assert found["sdk_version"] == "0.23.1"


def test_a_pin_may_move_from_requirements_to_a_run_line_and_the_image_pins_stay():
    before = image_pins.image_pins(requirements_text=REQUIREMENTS + "peft==0.18.1\n", cog_yaml=COG.replace(
        " peft==0.18.1", ""))
    after = image_pins.image_pins(requirements_text=REQUIREMENTS, cog_yaml=COG)
    assert {n: p.version for n, p in before.items()} == {n: p.version for n, p in after.items()}


def test_an_unpinned_package_on_a_run_line_is_an_error():
    with pytest.raises(image_pins.PinError, match="'pruna' without an exact pin"):
        image_pins.run_pins(COG.replace("pruna==0.3.4", "pruna"))


def test_every_package_the_kit_carries_has_the_images_exact_pin():
    """The kit's versions are the image's: requirements.txt's and cog.yaml's run: lines' (pruna and peft are on the
    latter since the lean-image change, which broke `script/device-kit` while the suite stayed green)."""
    pins = image_pins.versions(ROOT)
    kit = device_kit.kit_versions()
    assert set(kit) == {image_pins.canonical(n) for n in device_kit.KIT}
    for name, version in kit.items():
        assert str(version) == pins[name], name
    assert {"pruna", "peft", "diffusers", "torchao"} <= set(kit)


def test_device_kit_lists_the_kit_from_a_checkout_without_downloading():
    done = subprocess.run([sys.executable, "script/device_kit.py", "--list", str(ROOT / "no-such-kit")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pins = image_pins.versions(ROOT)
    for name in device_kit.KIT:
        row = next(line for line in done.stdout.splitlines() if line.strip().startswith(name + " "))
        assert row.split()[1] == pins[image_pins.canonical(name)], row


def test_the_runtime_environment_is_the_images_pins_and_cogs_sdk():
    assert set(image_pins.image_pins(ROOT)) <= runtime_distributions()
    assert {"cog", "coglet"} <= runtime_distributions()


def test_setup_installs_the_run_lines_pins_as_the_image_does():
    nodeps = subprocess.run([sys.executable, "script/image_pins.py", "nodeps"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    run = image_pins.run_pins((ROOT / "cog.yaml").read_text())
    assert nodeps == [p.spec for p in run.values() if p.nodeps]
    assert {"pruna", "peft"} <= {image_pins.canonical(s.split("==")[0]) for s in nodeps}
