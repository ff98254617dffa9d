"""The private base of hessfunc: pytrees (the only module that calls optree), input
checks, the second-order evaluation context and its kernel routes, memory guards, the
unwrapping of training wrappers, progress bars and the flat view of a matvec.

May import: torch, optree and the standard library, and other modules of this
package. Nothing else in hessfunc.
"""
