import os
import sys

# providers.py sits beside the benchmarks and is imported by name.
sys.path.insert(0, os.path.dirname(__file__))
