import os

# Run Triton kernels in the interpreter (numpy, on CPU tensors) unless the caller chose
# otherwise. Triton reads this variable when a kernel is decorated with @triton.jit,
# i.e. when its module is imported, so it must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
