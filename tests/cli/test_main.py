"""`python -m jaxrisk` is the console script: it lists every command, fast (no JAX import for --help)."""

import subprocess
import sys


def test_python_dash_m_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "jaxrisk", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("scan", "demo", "zoo", "generate", "inspect", "redteam", "circuits", "fragility", "detect"):
        assert command in out.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from jaxrisk.cli import main\n"
                            "try: main(['--help'])\nexcept SystemExit: pass\nprint('jax' in sys.modules)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().endswith("False"), probe.stdout


def test_detect_flags_offer_the_library_choices():
    from jaxrisk.anomaly import config
    from jaxrisk.cli import detect

    assert detect.DETECTOR_NAMES == config.DETECTOR_NAMES and detect.AGGREGATES == config.AGGREGATES
