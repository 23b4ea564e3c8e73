"""Pretrained weights from a file the user gives (``PRETRAINED``): reading it safely, telling what it holds,
and mapping torchvision's names onto frcnn's.

The file is told by its keys (:func:`pretrained_kind`): an ImageNet classification network (``conv1.*``,
``layer1.*``, ``features.*``) fills the backbone only, with or without FPN; torchvision's whole
``fasterrcnn_resnet50_fpn`` (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.*``) fills a
``NECK=fpn`` ResNet-50 model everywhere (:func:`torchvision_fpn_to_frcnn`): trunk, pyramid, RPN, the two fully
connected layers of the box head, and the box predictor when its class count is the model's. Any other detector's
weights (a C4 torchvision model, an frcnn checkpoint's ``model.safetensors``) and an FPN detector given to a C4
model are refused in one line. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from frcnn.config import Config
from frcnn.errors import CheckpointError


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PRETRAINED={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: one line, not a traceback
        raise CheckpointError(f"PRETRAINED={path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"PRETRAINED={path}: not a state dict of tensors")
    return state


def load_into(model: nn.Module, path: str, ignore_prefixes: tuple[str, ...],
               state: dict[str, Tensor] | None = None) -> None:
    """Load a torchvision-style state dict (``state``, else read from ``path``); keys under ``ignore_prefixes``
    (the classifier that the detector replaces, e.g. ``fc.``) are skipped in the file and not expected from it."""
    if state is None:
        state = load_state_dict_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match: name the first one, in one line
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(f"PRETRAINED={path}: does not match {type(model).__name__} ({first})") from None
    missing = [k for k in missing if not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise CheckpointError(
            f"PRETRAINED={path}: does not match {type(model).__name__} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )


# torchvision's ResNet children as frcnn's FPN trunk (Stages.body) numbers them
_BODY_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def pretrained_kind(state: dict[str, Tensor]) -> str:
    """What a ``PRETRAINED`` file holds, by its keys: ``frcnn-fpn`` / ``frcnn-c4`` (an frcnn detector's weights),
    ``torchvision-fpn`` / ``torchvision-c4`` (a torchvision Faster R-CNN with or without ``backbone.fpn``), or
    ``backbone`` (a classification network: ImageNet ResNet or VGG16, the tiny backbone's head)."""
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in state)

    if has("rpn.rpn_net.", "classifier.cls_score_net.", "head.trunk.", "head.fpn."):
        return "frcnn-fpn" if has("head.fpn.") else "frcnn-c4"
    if has("rpn.head.", "roi_heads.", "backbone."):
        return "torchvision-fpn" if has("backbone.fpn.") else "torchvision-c4"
    return "backbone"


_KIND_TEXT = {
    "frcnn-fpn": "the weights of an frcnn FPN detector (a checkpoint's model.safetensors)",
    "frcnn-c4": "the weights of an frcnn C4 detector (a checkpoint's model.safetensors)",
    "torchvision-fpn": "a torchvision Faster R-CNN R50-FPN state dict",
    "torchvision-c4": "a torchvision Faster R-CNN state dict without a feature pyramid (C4: no backbone.fpn.*)",
}


def check_kind(cfg: Config, kind: str) -> None:
    """Refuse, in one line, a file that is not for this model (see the module docstring)."""
    if kind == "backbone" or (kind == "torchvision-fpn" and cfg.NECK == "fpn"):
        return
    model = "NECK=fpn" if cfg.NECK == "fpn" else "C4 (NECK=none)"
    if kind.startswith("frcnn"):
        hint = ("PRETRAINED takes torchvision weights (an ImageNet backbone, or fasterrcnn_resnet50_fpn's with "
                "NECK=fpn); an frcnn checkpoint is read by --checkpoint / --resume")
    elif cfg.NECK == "fpn":
        hint = "give an ImageNet backbone or torchvision's fasterrcnn_resnet50_fpn weights"
    else:
        hint = "a detector's weights load only into NECK=fpn models (preset voc-r50-fpn); give C4 an ImageNet backbone"
    raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT[kind]}, this model is {model}: {hint}")


def torchvision_fpn_to_frcnn(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """torchvision ``fasterrcnn_resnet50_fpn`` state dict -> frcnn ``FasterRCNN`` names (``head.trunk.body.*``,
    ``head.fpn.*``, ``rpn.*``, ``classifier.*``). Both torchvision layouts are read: ``inner_blocks.i.0.weight``
    and ``rpn.head.conv.0.0`` (0.13 on) and ``inner_blocks.i.weight`` and ``rpn.head.conv`` (the published COCO
    file).

    - objectness: torchvision has one logit ``z`` per anchor (sigmoid), frcnn two (softmax over background,
      foreground; channels all A background, then all A foreground). Background weights and biases 0 and
      foreground ``z``'s give ``softmax([0, z])[1] = sigmoid(z)`` exactly.
    - RPN deltas: torchvision views its (N, 4A, H, W) output as (N, A, 4, H, W), frcnn too: copied as they are.
    - box predictor: torchvision decodes ``bbox_pred / (10, 10, 5, 5)`` (its ``bbox_reg_weights``), frcnn
      ``bbox_pred * BBOX_NORMALIZE_STDS + BBOX_NORMALIZE_MEANS``; the rows are rescaled to give the same deltas,
      a factor of exactly 1 for the default stds (0.1, 0.1, 0.2, 0.2) and means 0.
    """
    out: dict[str, Tensor] = {}
    a = None
    for key, v in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        name = parts[-1]
        if key.startswith("backbone.body."):
            child = parts[2]
            if child not in _BODY_INDEX:  # fc / avgpool: not in torchvision's detector either
                continue
            out[".".join(["head.trunk.body", str(_BODY_INDEX[child]), *parts[3:]])] = v
        elif key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            kind = "lateral" if parts[2] == "inner_blocks" else "output"
            out[f"head.fpn.{kind}.{parts[3]}.{name}"] = v
        elif key.startswith("rpn.head.conv."):
            out[f"rpn.rpn_net.{name}"] = v
        elif key.startswith("rpn.head.cls_logits."):
            a = v.shape[0]
            out[f"rpn.rpn_cls_score_net.{name}"] = torch.cat((torch.zeros_like(v), v))
        elif key.startswith("rpn.head.bbox_pred."):
            out[f"rpn.rpn_bbox_pred_net.{name}"] = v
        elif key.startswith(("roi_heads.box_head.fc6.", "roi_heads.box_head.fc7.")):
            out[f"classifier.tail.{1 if parts[2] == 'fc6' else 3}.{name}"] = v
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            out[f"classifier.cls_score_net.{name}"] = v
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            # frcnn's raw output r gives r * std + mean = torchvision's t / w: r = t / (w std) - mean / std
            weights = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoIHeads bbox_reg_weights
            stds, means = cfg.TRAIN.BBOX_NORMALIZE_STDS, cfg.TRAIN.BBOX_NORMALIZE_MEANS
            k1 = v.shape[0] // 4
            scale = v.new_tensor([1.0 / (w * s) for w, s in zip(weights, stds)]).repeat(k1)  # (1, 1, 1, 1)
            v = v * scale.view((-1,) + (1,) * (v.dim() - 1))
            if name == "bias":
                v = v - v.new_tensor([m / s for m, s in zip(means, stds)]).repeat(k1)
            out[f"classifier.bbox_pred_net.{name}"] = v
        else:
            raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT['torchvision-fpn']} with a key frcnn "
                                  f"does not know: {key}")
    if a is None:
        raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT['torchvision-fpn']} without rpn.head.*")
    return out


def load_checked(module: nn.Module, state: dict[str, Tensor], path: str, what: str) -> None:
    """``state`` into ``module`` (strict: every key on both sides); a mismatch is one line naming the first."""
    own = module.state_dict()
    for key, v in state.items():
        if key in own and own[key].shape != v.shape:
            raise CheckpointError(f"PRETRAINED={path}: does not match {what}: {key} is {tuple(v.shape)} in the file, "
                                  f"{tuple(own[key].shape)} in the model")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"PRETRAINED={path}: does not match {what} (missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})")


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_detector_heads(model: nn.Module, heads: dict[str, Tensor], path: str) -> None:
    """The RPN and box predictor of a torchvision Faster R-CNN file (:func:`torchvision_fpn_to_frcnn`, the
    ``rpn.`` and ``classifier.`` keys) into a built ``FasterRCNN``. A predictor for another number of classes
    (torchvision's COCO one has 91) is left out, in one printed line: the model's fresh one is fine-tuned."""
    load_checked(model.rpn, _under(heads, "rpn."), path, "the model's RPN")
    predictor = _under(heads, "classifier.")
    k1 = model.num_classes + 1
    file_k1 = predictor["cls_score_net.weight"].shape[0] if "cls_score_net.weight" in predictor else 0
    if file_k1 != k1:
        has = f"has {file_k1} classes (background included)" if file_k1 else "has none"
        print(f"PRETRAINED={path}: its box predictor {has}, the model {k1}: the predictor keeps its fresh init "
              "(to be trained), everything else is loaded")
        return
    for name in ("cls_score_net", "bbox_pred_net"):
        load_checked(getattr(model.classifier, name), _under(predictor, name + "."), path,
                      f"the model's box predictor ({name})")
