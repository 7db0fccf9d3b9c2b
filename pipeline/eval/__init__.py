"""Evaluation: benchmark readers and protocols, the methods evaluated, mIoU, and the report."""
