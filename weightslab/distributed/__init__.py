"""What a torch.distributed job needs: the only place weightslab touches ``torch.distributed``.

:mod:`.world` is this process's rank and the few collectives weightslab runs on a gloo group of its
own; :mod:`.job` is the protocol the ranks follow at step boundaries, saves and resumes (built on
the world, and a job of one for a single process); :mod:`.ranks` decides what per-rank state each
rank of a resumed job gets (pure); :mod:`.sharded` saves and loads sharded tensors (FSDP2, DTensor)
with torch.distributed.checkpoint. A single-process run imports ``torch.distributed`` only to ask
whether a process group exists.
"""
