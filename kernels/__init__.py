"""Triton kernels of fastcnn (installed as ``fastcnn.kernels``): one file per fused op."""
