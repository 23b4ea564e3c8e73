"""Data sets: PASCAL VOC folders and the synthetic shapes set used by ``frcnn demo``."""
