"""The test session never writes to the user's artifact cache."""
from __future__ import annotations

import os
from pathlib import Path

from exporter.cache import ArtifactCache


def test_default_cache_is_the_sessions_own(tmp_path_factory):
    root = ArtifactCache.default().root
    assert root == Path(os.environ["ONDEVICE_LORA_CACHE"])
    assert Path(tmp_path_factory.getbasetemp()) in root.parents
