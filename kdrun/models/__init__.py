"""Model factory (timm, torchvision, CIFAR-style nets) and checkpoint loading."""
from kdrun.models.factory import check_model_name, count_parameters, create_model

__all__ = ["check_model_name", "count_parameters", "create_model"]
