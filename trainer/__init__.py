"""The training loop: recorded outcomes to preference pairs, selection, DPO training and evaluation.

Built in the trainer issue; nothing here runs yet.
"""
