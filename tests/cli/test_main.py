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


def test_arch_flags_offer_every_architecture():
    from jaxrisk.cli import build_parser
    from jaxrisk.models.classifiers import ARCHS

    import argparse

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("scan", "demo", "detect"):
        arch = next(a for a in commands[name]._actions if a.dest == "arch")
        assert sorted(arch.choices) == sorted(ARCHS), name
