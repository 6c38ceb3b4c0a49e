"""gpunn"""
