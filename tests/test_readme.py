"""The README's front door stays true: the keys, configs and files it names exist."""

import re

from conftest import REPO
from detectron2.config import get_cfg

from lvis_longtail.config import add_longtail_config

README = (REPO / "README.md").read_text()


def _key_exists(cfg, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        if part in ("*", "…") or not part:
            return True
        if part not in node:
            return False
        node = node[part]
    return True


def test_readme_is_short():
    assert len(README.splitlines()) <= 250


def test_every_key_the_readme_names_exists():
    cfg = add_longtail_config(get_cfg())
    pattern = r"`((?:MODEL|TEST|INPUT|DATASETS|DATALOADER|SOLVER)\.[A-Z0-9_.{},*]+)"
    keys = set(re.findall(pattern, README))
    assert len(keys) >= 15, keys
    missing = []
    for key in keys:
        # `MODEL.ROI_{BOX,MASK}_HEAD.X` names two keys.
        m = re.match(r"(.*)\{(.*)\}(.*)", key)
        variants = [m.group(1) + v + m.group(3) for v in m.group(2).split(",")] if m else [key]
        missing += [v for v in variants if not _key_exists(cfg, v.rstrip("."))]
    assert not missing, missing


def test_every_config_and_doc_the_readme_names_exists():
    configs = set(re.findall(r"`((?:[\w.]+/)?[\w.]+\.yaml)`", README))
    assert len(configs) >= 20
    lvis = REPO / "configs" / "LVISv1"
    roots = (REPO, lvis, REPO / "configs")
    missing = [c for c in configs if "..." not in c and not any((r / c).exists() for r in roots)]
    assert not missing, missing
    links = re.findall(r"\]\(((?:docs|benchmarks|lvis_longtail)/[^)#]+)", README)
    assert len(links) >= 5
    assert not [p for p in links if not (REPO / p).exists()]
