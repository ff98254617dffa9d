"""Kronecker-factored curvature: K-FAC and EK-FAC of the linear and convolution layers
found from what runs, and their use as the curvature of influence functions.

May import: ``hessfunc._base``, ``hessfunc.losses`` and the products. Not influence,
data or distributed.
"""
