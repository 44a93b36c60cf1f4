"""The on-device client: few-shot personalization and best-of-N ranking with numpy and onnxruntime, no torch.

Modules: state (durable local state), personalize (w from the user's choices, strength, forget), ranking
(r = w . A e), encoder (ONNX pair encoder), export (torch-side export of that encoder), cli.
"""
