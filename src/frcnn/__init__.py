"""frcnn: the classic Faster R-CNN, one file per stage of the pipeline.

Follow one image from pixels to boxes:
``transforms`` (pre-processing) -> ``model.backbones`` (head) -> ``model.rpn`` (region proposal
network + proposal layer) -> ``model.roi_heads`` (proposal target layer, RoI pooling, classification
layer) -> ``model.detector`` (inference with per-class NMS).
"""

__version__ = "0.1.0"
