"""docs/options.md is what scripts/options_reference.py reads from the plugin's parsers, and every option has an
entry there: adding an option without documenting it fails here."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import options_reference  # noqa: E402


def test_docs_options_md_is_up_to_date():
    p = subprocess.run([sys.executable, "scripts/options_reference.py", "--check"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr[-2000:]


def test_every_registered_option_and_every_arch_is_in_the_reference():
    sections, archs = options_reference.collect()
    text = open(options_reference.OUT, encoding="utf-8").read()
    for _, opts in sections:
        for opt in opts:
            assert f"| `{opt}` |" in text
    assert {"latent_transformer", "latent_transformer_tiny", "latent_transformer_tiny_onepass"} <= set(archs)
    tiny = archs["latent_transformer_tiny"]
    assert tiny.num_codes == 512 and tiny.num_compress_steps == 1  # defaults read from the arch itself


def test_an_option_without_origin_or_a_stale_origin_is_an_error(monkeypatch):
    origin = dict(options_reference.ORIGIN)
    removed = origin.pop("--num-codes")
    monkeypatch.setattr(options_reference, "ORIGIN", origin)
    with pytest.raises(SystemExit, match="lacks \\['--num-codes'\\]"):
        options_reference.render()
    monkeypatch.setattr(options_reference, "ORIGIN", {**origin, "--num-codes": removed, "--no-such-option": "x"})
    with pytest.raises(SystemExit, match="no-such-option"):
        options_reference.render()
