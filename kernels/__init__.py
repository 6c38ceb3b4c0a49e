"""gpunn.kernels"""
