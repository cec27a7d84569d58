"""Deploy-time runtimes of a U-Net (runtimes: eager, compile, ONNX Runtime, OpenVINO, ...), the table
of their names and precisions (choices, torch-free) and the ONNX export of a module (onnx)."""
