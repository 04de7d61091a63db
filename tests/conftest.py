import os
import sys

# tests/ on the path so test modules can share tests/cases.py.
sys.path.insert(0, os.path.dirname(__file__))
