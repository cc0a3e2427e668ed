"""Networks to represent: the CIFAR ResNets (shortcut option A)."""
from .cifar_resnet import DEPTHS, BasicBlock, CifarResNet, cifar_resnet

__all__ = ["DEPTHS", "BasicBlock", "CifarResNet", "cifar_resnet"]
