"""The distilled student as deployable artifacts: exported files (ONNX, the torch.export program,
TorchScript) with their preprocessing, and an int8 model quantized after training, each run back on
the test split and timed beside the PyTorch student (artifacts.py)."""
