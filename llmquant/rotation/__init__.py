"""Rotations before rounding (QuaRot / SpinQuant): Hadamard matrices and their fast factored forms
(hadamard), the rotations fused into the weights before rounding (fused: R1 on the residual stream,
R2 on each head's values), and the online rotation of a linear's input at run time (online: R4).
"""
