"""The training loop: recorded outcomes to preference pairs, selection, DPO training and evaluation.

So far: ``sandbox`` (the one executor for untrusted code), ``records`` (training material from
the database), ``pairs`` (execution-verified preference pairs), ``selection`` (CDAS),
``train`` and ``config`` (DPO plus NLL on a LoRA adapter with TRL, resumable) and ``packing``
(padding-free packed DPO batches).
"""
