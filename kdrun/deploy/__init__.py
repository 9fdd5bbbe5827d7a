"""The distilled student's deployable files: exported (ONNX, the torch.export program, TorchScript) with their
preprocessing, an int8 model quantized after training (quantize.py) or through quantization-aware training
(qat.py), and ONNX Runtime to run them. The run's deploy step (kdrun.run.artifacts) checks each on the test
split and times it beside the PyTorch student."""
