"""docs/config_keys.md is generated from the code, and every key has its comment."""

from conftest import REPO
from detectron2.config import get_cfg
from detectron2.modeling import ROI_HEADS_REGISTRY

from lvis_longtail.config import add_longtail_config
from lvis_longtail.config_check import all_keys
from lvis_longtail.registries import CLS_LOSS_REGISTRY
from lvis_longtail.tools import config_reference
from lvis_longtail.tools.config_reference import COMMAND, documented_keys, keys_of, render

REFERENCE = REPO / "docs" / "config_keys.md"


def test_committed_reference_is_current():
    assert REFERENCE.read_text() == render(), f"docs/config_keys.md is stale: run `{COMMAND}`"


def test_names_registered_by_projects_or_tests_are_not_listed(monkeypatch):
    before = render()

    class Extra:  # as a detectron2 project's head (PointRend registers some when imported)
        __module__ = "detectron2.projects.point_rend.roi_heads"

    monkeypatch.setitem(ROI_HEADS_REGISTRY._obj_map, "ExtraROIHeads", Extra)
    monkeypatch.setitem(CLS_LOSS_REGISTRY._obj_map, "ExtraLoss", Extra)
    assert render() == before


def test_every_key_of_the_package_is_documented_with_a_comment():
    detectron2_keys = set(all_keys(get_cfg()))
    ours = set(all_keys(add_longtail_config(get_cfg()))) - detectron2_keys
    leaves, nodes = documented_keys()
    assert ours <= {d.key for d in leaves}
    assert [d.key for d in leaves if not d.comment] == []
    assert [n for n, comment in nodes.items() if not comment] == []
    # detectron2 keys assigned again (their valid values grew) are documented too
    assert {d.key for d in leaves} - ours == {
        "MODEL.ROI_BOX_HEAD.POOLER_TYPE",
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
    }


def test_keys_are_read_in_the_order_they_are_defined(tmp_path, monkeypatch):
    module = tmp_path / "demo_config.py"
    module.write_text(
        "def add(cfg):\n"
        "    # first key,\n"
        "    # two lines\n"
        "    cfg.A.X = 1\n"
        "    _more(cfg)\n"
        "    cfg.A.Z = 3\n"
        "\n"
        "\n"
        "def _more(cfg):\n"
        "    # a node\n"
        "    cfg.A.N = CN()\n"
        "\n"
        "    cfg.A.N.Y = 2\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import demo_config

    docs = keys_of(demo_config.add)
    assert [(d.key, d.comment, d.is_node) for d in docs] == [
        ("A.X", "first key, two lines", False),
        ("A.N", "a node", True),
        ("A.N.Y", "", False),  # a blank line ends a comment: none here
        ("A.Z", "", False),
    ]


def test_the_tool_writes_the_reference(tmp_path, capsys):
    out = tmp_path / "keys.md"
    config_reference.main(["--out", str(out)])
    assert out.read_text() == render()
    config_reference.main([])
    assert capsys.readouterr().out == render()
