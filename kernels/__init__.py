"""loc3r.kernels"""
