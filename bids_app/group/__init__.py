"""Group-level analyses (TBSS-style statistics, bundle segmentation)."""
