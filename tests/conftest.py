import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the scripts live at the top level, like the users' copies
    sys.path.insert(0, ROOT)
