"""Where to put adapters: PAGE scores of candidate modules, and DomLoRA, which adapts only the best."""

from splice.placement.domlora import DomLoRA
from splice.placement.page import Placement, SiteScore, page

__all__ = ["DomLoRA", "Placement", "SiteScore", "page"]
