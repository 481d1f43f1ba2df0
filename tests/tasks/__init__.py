"""Real-task evaluation harnesses: data with ground truth and the task metric for trained models from wheels.

``from tests.tasks import ocr`` (the repository root is on ``sys.path`` via ``tests/conftest.py``).
"""
