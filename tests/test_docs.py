"""Docs that are generated from code stay in sync with it."""

from pathlib import Path

from lmtrain.config import DOC_HEADER, config_reference


def test_config_reference_is_current():
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    assert doc.strip() == (DOC_HEADER + config_reference()).strip(), \
        "docs/config.md is stale: run `python -m lmtrain.config > docs/config.md`"
