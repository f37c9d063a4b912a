"""Whether this process may reach the Hugging Face hub: HF_HUB_OFFLINE, as huggingface_hub and the user spell it."""

from __future__ import annotations

import os


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (1/true/yes/on, any case), read now or when huggingface_hub was imported."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1", "true", "yes", "on")
