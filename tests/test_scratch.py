from lora_ckpt.cli import LAYOUT_NAMES
from lora_ckpt.layouts import LAYOUTS


def test_scratch_is_registered():
    assert "scratch" in LAYOUTS and "scratch" in LAYOUT_NAMES
