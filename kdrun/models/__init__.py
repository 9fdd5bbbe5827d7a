"""Model factory (timm, torchvision, CIFAR-style nets) and checkpoint loading."""
from kdrun.evaluation.cost import count_parameters
from kdrun.models.factory import check_model_name, create_model

__all__ = ["check_model_name", "count_parameters", "create_model"]
