"""Networks to represent: CIFAR ResNets (shortcut option A), torchvision ResNets, user models."""
from .cifar_resnet import DEPTHS, BasicBlock, CifarResNet, cifar_resnet
from .registry import (ARCHS, build_model, import_callable, load_weights, read_model_metadata,
                       save_model_file)
from .torchvision_resnet import TORCHVISION_RESNETS, torchvision_resnet

__all__ = ["DEPTHS", "BasicBlock", "CifarResNet", "cifar_resnet", "ARCHS", "build_model",
           "import_callable", "load_weights", "read_model_metadata", "save_model_file",
           "TORCHVISION_RESNETS", "torchvision_resnet"]
