"""Test setup. TRITON_INTERPRET must be set before triton is first imported: on a CPU machine the Triton
kernels can only run in the interpreter, which the kernel tests use to compare each kernel with its reference."""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
