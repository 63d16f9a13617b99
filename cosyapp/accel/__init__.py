"""Optional accelerated runtimes: ONNX export of the flow estimator and TensorRT engines built from it.

Nothing here is needed to run cosyapp: `onnx_export` needs only torch (onnxruntime to check the export),
`trt` imports without TensorRT or CUDA and reports why it cannot be used.
"""
