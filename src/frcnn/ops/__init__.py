"""Box and RoI operators the detector calls, written in PyTorch ops where they measurably beat torchvision's CPU
kernels: greedy NMS (``nms``), Gaussian soft-NMS (``soft_nms``) and parallel RoI pooling (``roi_ops``). Each is a
drop-in for the torchvision operator it names, tested against it; ``frcnn.model`` holds the detector that uses them."""
