"""Evaluation: the MBPP / HumanEval protocol and the sandboxed execution of generated programs."""
