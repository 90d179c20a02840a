"""``python -m fastcnn.info``: print what this installation can run (see fastcnn.environment)."""
from .environment import info

if __name__ == "__main__":
    info()
